"""Noise calibration: the smallest noise multiplier whose epsilon does not exceed a target.

Bisection on sigma in log space keeps the invariant ``epsilon(hi) <= target`` and returns ``hi``, so the result
never overshoots the target (the epsilon is evaluated with the same accountant the run will use). For PLD the
bracket starts from the RDP calibration: RDP upper-bounds PLD, so the RDP sigma already meets the target under
PLD and the search only has to move down from it, with few PLD evaluations.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from accounting.accountants import (
    EpsilonResult,
    check_accountant,
    check_delta,
    schedule_epsilon,
)

DEFAULT_MAX_NOISE_MULTIPLIER = 100.0
DEFAULT_MIN_NOISE_MULTIPLIER = 0.05
DEFAULT_REL_TOL = 1e-3


class CalibrationError(ValueError):
    """No noise multiplier in the searched range reaches the target epsilon."""


@dataclass(frozen=True)
class Calibration:
    """A calibrated noise multiplier and the epsilon it actually gives (at most the target).

    Attributes:
        noise_multiplier: sigma of ONE release (before dividing by sqrt(repeats)).
        epsilon: epsilon of the schedule at this sigma (<= target_epsilon).
        delta: delta it holds at.
        target_epsilon: the requested epsilon.
        accountant: accountant that produced ``epsilon``.
        sampling_rate, steps, repeats: the schedule.
    """

    noise_multiplier: float
    epsilon: float
    delta: float
    target_epsilon: float
    accountant: str
    sampling_rate: float
    steps: int
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=256)  # a pure function of its arguments; stages and studies repeat schedules
def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    repeats: int = 1,
    accountant: str = "pld",
    max_noise_multiplier: float = DEFAULT_MAX_NOISE_MULTIPLIER,
    rel_tol: float = DEFAULT_REL_TOL,
) -> Calibration:
    """Smallest sigma (to relative tolerance ``rel_tol``) with epsilon(sigma) <= target_epsilon.

    Raises:
        ValueError: on a bad target, delta, rate, steps or repeats.
        CalibrationError: when even ``max_noise_multiplier`` exceeds the target.
    """
    check_accountant(accountant)
    check_delta(delta)
    if not (target_epsilon > 0.0) or math.isinf(target_epsilon):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    if not (rel_tol > 0.0):
        raise ValueError(f"rel_tol must be > 0, got {rel_tol}")

    def eps(sigma: float, acc: str) -> EpsilonResult:
        return schedule_epsilon(
            noise_multiplier=sigma,
            sampling_rate=sampling_rate,
            steps=steps,
            delta=delta,
            repeats=repeats,
            accountant=acc,
        )

    # RDP is cheap and upper-bounds PLD: calibrate under RDP first; for PLD it is the upper bracket.
    hi, hi_result = _bisect(
        lambda s: eps(s, "rdp"), target_epsilon, DEFAULT_MIN_NOISE_MULTIPLIER, max_noise_multiplier, rel_tol
    )
    if accountant == "pld":
        hi_result = eps(hi, "pld")
        if hi_result.epsilon > target_epsilon:  # only possible through PLD discretization at the boundary
            hi, hi_result = _bisect(
                lambda s: eps(s, "pld"), target_epsilon, hi, max_noise_multiplier, rel_tol
            )
        else:
            lo = max(DEFAULT_MIN_NOISE_MULTIPLIER, hi * 0.5)
            hi, hi_result = _bisect(lambda s: eps(s, "pld"), target_epsilon, lo, hi, rel_tol, hi_result)
    assert hi_result.epsilon <= target_epsilon, "calibration must never overshoot the target"
    return Calibration(
        noise_multiplier=hi,
        epsilon=hi_result.epsilon,
        delta=delta,
        target_epsilon=target_epsilon,
        accountant=accountant,
        sampling_rate=sampling_rate,
        steps=int(steps),
        repeats=int(repeats),
    )


def _bisect(
    eps_of,
    target: float,
    lo: float,
    hi: float,
    rel_tol: float,
    hi_result: EpsilonResult | None = None,
) -> tuple[float, EpsilonResult]:
    """Geometric bisection with the invariant eps(hi) <= target; returns (hi, eps(hi))."""
    if hi_result is None:
        hi_result = eps_of(hi)
    if hi_result.epsilon > target:
        raise CalibrationError(
            f"even noise multiplier {hi:g} gives epsilon {hi_result.epsilon:.4g} > target {target:g}; "
            f"raise the target epsilon, lower the sampling rate or steps, or allow a larger noise multiplier"
        )
    lo_result = eps_of(lo)
    if lo_result.epsilon <= target:
        return lo, lo_result
    while hi / lo > 1.0 + rel_tol:
        mid = math.sqrt(lo * hi)
        mid_result = eps_of(mid)
        if mid_result.epsilon <= target:
            hi, hi_result = mid, mid_result
        else:
            lo = mid
    return hi, hi_result


@dataclass(frozen=True)
class StageSchedule:
    """The planned schedule of one stage, for a budget split.

    Attributes:
        sampling_rate: Poisson rate q of each step.
        steps: number of steps.
        repeats: releases per sample (PPO epochs).
    """

    sampling_rate: float
    steps: int
    repeats: int = 1


def split_budget(
    *,
    total_epsilon: float,
    total_delta: float,
    shares: Mapping[str, float],
    schedules: Mapping[str, StageSchedule],
    accountant: str = "pld",
) -> dict[str, Calibration]:
    """Per-stage sigma for sequential composition: stage k gets (share_k * eps, share_k * delta).

    Basic composition of (eps_k, delta_k) guarantees the composed run is (sum eps_k, sum delta_k) = (eps, delta)
    DP whatever the stages' mechanisms; the tight composition of the calibrated stages (``epsilon`` over all
    their events) is usually noticeably smaller, and that smaller number is what the ledger reports.

    Raises:
        ValueError: when shares and schedules name different stages, a share is not > 0, or shares do not sum
            to 1.
    """
    if set(shares) != set(schedules):
        raise ValueError(
            f"shares name stages {sorted(shares)} but schedules name {sorted(schedules)}: give both for each stage"
        )
    if not shares:
        raise ValueError("split_budget needs at least one stage")
    for name, share in shares.items():
        if not (share > 0.0):
            raise ValueError(f"share of stage {name!r} must be > 0, got {share}")
    total_share = math.fsum(shares.values())
    if abs(total_share - 1.0) > 1e-9:
        raise ValueError(f"stage shares must sum to 1, got {total_share:g} ({dict(shares)})")
    return {
        name: calibrate_noise_multiplier(
            target_epsilon=total_epsilon * share,
            delta=total_delta * share,
            sampling_rate=schedules[name].sampling_rate,
            steps=schedules[name].steps,
            repeats=schedules[name].repeats,
            accountant=accountant,
        )
        for name, share in shares.items()
    }


def calibrate_at_rdp_order(
    *, target_epsilon: float, delta: float, sampling_rate: float, steps: int, repeats: int = 1, order: float
) -> float:
    """The smallest noise multiplier (to 1e-4 relative) whose RDP epsilon AT THE GIVEN ORDER over the schedule is at
    most ``target_epsilon``.

    Why a fixed order: the run's RDP privacy filter admits a step by its RDP at one order chosen before the run;
    a sigma calibrated at the best order for this stage alone could exceed the filter's budget at the run's order
    and be refused mid-stage. Never overshoots (asserted).

    Raises:
        CalibrationError: no multiplier <= 1e4 reaches the target at this order.
    """
    def eps(sigma: float) -> float:
        return schedule_epsilon(
            noise_multiplier=sigma, sampling_rate=sampling_rate, steps=steps, delta=delta, repeats=repeats,
            accountant="rdp", rdp_order=order,
        ).epsilon

    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise CalibrationError(
                f"no noise multiplier <= 1e4 reaches epsilon {target_epsilon} at RDP order {order}"
            )
    for _ in range(60):
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4 * hi:
            break
    assert eps(hi) <= target_epsilon
    return hi

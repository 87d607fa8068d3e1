"""Accountants over PrivacyEvents: PLD for fixed schedules, an RDP filter order for adaptive ones.

All math is dp-accounting's. This module only (1) coalesces runs of identical consecutive events into
``SelfComposedDpEvent(event, n)`` so 100k steps cost as much as their number of distinct mechanisms, (2) picks
the PLD discretization, and (3) evaluates RDP at a single order fixed before the run (the privacy filter of
Feldman & Zrnic 2021, docs/design.md section 2 "Adaptivity").

PLD discretization. dp-accounting's default ``value_discretization_interval`` is 1e-4; it costs 0.4-2.5 s for
one DP-SGD schedule. We compute twice: first at 1e-3 (tens of ms) to learn the scale of epsilon, then at the
largest of (1e-3, 5e-4, 2e-4, 1e-4) that is <= eps_first / 3000 (never finer than dp-accounting's default). The
absolute error of the pessimistic PLD grows to about 13 times the interval over 10^4 compositions, so eps/3000
keeps the result within about 0.5% of the default answer (tests pin < 1% on a grid of standard settings) while
the second pass stays fast. Pessimistic discretization only rounds privacy losses up, so a coarser grid never
under-reports epsilon. Histories of PoissonSampled Gaussians are composed from cached single-mechanism PLDs built
exactly as ``PLDAccountant`` builds them (tests check equality); any other DpEvent goes through ``PLDAccountant``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.pld import privacy_loss_distribution as PLD
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon as rdp_to_dp_epsilon

from accounting.events import PrivacyEvent

Accountant = Literal["pld", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
PLD_FIRST_PASS_DISCRETIZATION = 1e-3
PLD_DISCRETIZATION_LADDER = (1e-3, 5e-4, 2e-4, 1e-4)
PLD_DISCRETIZATION_EPSILON_FRACTION = 1.0 / 3000.0

EventRun = tuple[PrivacyEvent, int]
"""A run of ``count`` consecutive events with the same mechanism (same q and sigma_eff / sqrt(K))."""


@dataclass(frozen=True)
class EpsilonResult:
    """An epsilon and everything needed to reproduce it.

    Attributes:
        epsilon: the (epsilon, delta)-DP epsilon; 0.0 when no event was composed.
        delta: the delta it holds at.
        accountant: "pld" or "rdp" -- always reported with the number.
        rdp_order: the single RDP order used ("rdp" with a privacy filter), or None (all default orders).
        pld_discretization: the PLD value discretization interval used, or None for RDP.
        num_events: number of PrivacyEvents composed.
    """

    epsilon: float
    delta: float
    accountant: str
    rdp_order: float | None = None
    pld_discretization: float | None = None
    num_events: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def coalesce(events: Iterable[PrivacyEvent]) -> list[EventRun]:
    """Group consecutive events with the same mechanism into (event, count) runs, keeping order."""
    runs: list[list[Any]] = []
    for event in events:
        if runs and runs[-1][0].same_mechanism(event):
            runs[-1][1] += 1
        else:
            runs.append([event, 1])
    return [(e, n) for e, n in runs]


def schedule(
    *, noise_multiplier: float, sampling_rate: float, steps: int, repeats: int = 1, stage: str = "plan"
) -> list[EventRun]:
    """A fixed schedule (``steps`` identical gradient releases) as one run, without materializing the steps."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    event = PrivacyEvent(
        stage=stage,
        step=0,
        purpose="gradient",
        sampling_rate=sampling_rate,
        noise_multiplier=noise_multiplier,
        repeats=repeats,
    )
    return [(event, int(steps))]


def to_dp_event(runs: Sequence[EventRun]) -> dp_accounting.DpEvent:
    """ComposedDpEvent of SelfComposedDpEvent(run event, count): the whole history as one immutable value."""
    parts = [
        event.to_dp_event() if count == 1 else dp_accounting.SelfComposedDpEvent(event.to_dp_event(), count)
        for event, count in runs
    ]
    return dp_accounting.ComposedDpEvent(parts)


def pld_discretization(first_pass_epsilon: float) -> float:
    """The second-pass interval: the largest rung of PLD_DISCRETIZATION_LADDER <= eps / 3000 (see module doc).

    A fixed ladder, not a continuous value, so single-mechanism PLDs are reused from the cache across calls.
    """
    for interval in PLD_DISCRETIZATION_LADDER:
        if interval <= first_pass_epsilon * PLD_DISCRETIZATION_EPSILON_FRACTION:
            return interval
    return PLD_DISCRETIZATION_LADDER[-1]


def pld_epsilon(dp_event: dp_accounting.DpEvent, *, delta: float) -> tuple[float, float]:
    """(epsilon, discretization) of any DpEvent under dp-accounting's PLDAccountant (two passes, module doc)."""
    check_delta(delta)
    first = _pld_accountant_epsilon(dp_event, delta, PLD_FIRST_PASS_DISCRETIZATION)
    interval = pld_discretization(first)
    if interval == PLD_FIRST_PASS_DISCRETIZATION:
        return first, interval
    return _pld_accountant_epsilon(dp_event, delta, interval), interval


def _pld_accountant_epsilon(dp_event: dp_accounting.DpEvent, delta: float, interval: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=interval)
    accountant.compose(dp_event)
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def _run_pld(sampling_rate: float, sigma: float, count: int, interval: float) -> Any:
    """PLD of ``count`` PoissonSampled(q, Gaussian(sigma)) releases, built exactly as PLDAccountant builds it.

    Cached: dp-accounting rebuilds a subsampled-Gaussian PLD (about 10^4 scalar inversions) on every accountant,
    and the privacy filter asks about the same mechanisms every step.
    """
    if sampling_rate >= 1.0:
        return PLD.from_gaussian_mechanism(
            standard_deviation=sigma / math.sqrt(count), value_discretization_interval=interval
        )
    if count > 1:
        return _run_pld(sampling_rate, sigma, 1, interval).self_compose(count)
    return PLD.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=interval, sampling_prob=sampling_rate
    )


def _runs_pld_epsilon(key: tuple[tuple[float, float, int], ...], delta: float, interval: float) -> float:
    pld = PLD.identity(value_discretization_interval=interval)
    for q, sigma, count in key:
        pld = pld.compose(_run_pld(q, sigma, count, interval))
    return float(pld.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=4096)
def _cached_pld_epsilon(key: tuple[tuple[float, float, int], ...], delta: float) -> tuple[float, float]:
    """PLD (epsilon, interval) of a coalesced history, memoized: the filter re-asks about unchanged stages."""
    first = _runs_pld_epsilon(key, delta, PLD_FIRST_PASS_DISCRETIZATION)
    interval = pld_discretization(first)
    if interval == PLD_FIRST_PASS_DISCRETIZATION:
        return first, interval
    return _runs_pld_epsilon(key, delta, interval), interval


@functools.lru_cache(maxsize=65536)
def mechanism_rdp(*, sampling_rate: float, composed_noise_multiplier: float, order: float) -> float:
    """RDP at ``order`` of one PoissonSampled(q, Gaussian(sigma)) release, from a fresh dp-accounting accountant.

    Cached per mechanism: a controller's history has few distinct mechanisms per order, and RDP composes by
    addition, so the filter sums these values instead of re-running the accountant over the whole ledger.
    """
    event = PrivacyEvent(
        stage="_",
        step=0,
        purpose="other",
        sampling_rate=sampling_rate,
        noise_multiplier=composed_noise_multiplier,
    )
    accountant = RdpAccountant(orders=[order])
    accountant.compose(event.to_dp_event())
    return float(accountant.rdp[0])


def rdp_at_order(runs: Sequence[EventRun], *, order: float) -> float:
    """Total RDP at one order of all runs (additive composition, valid under adaptivity with a filter)."""
    if not (order > 1.0) or math.isinf(order):
        raise ValueError(f"rdp_order must be a finite number > 1, got {order}")
    return math.fsum(
        count
        * mechanism_rdp(
            sampling_rate=e.sampling_rate, composed_noise_multiplier=e.composed_noise_multiplier, order=order
        )
        for e, count in runs
    )


def rdp_epsilon_at_order(rdp: float, *, order: float, delta: float) -> float:
    """dp-accounting's RDP -> (epsilon, delta) conversion at one order."""
    check_delta(delta)
    eps, _ = rdp_to_dp_epsilon([order], [rdp], delta)
    return float(eps)


def epsilon(
    runs: Sequence[EventRun], *, delta: float, accountant: str = "pld", rdp_order: float | None = None
) -> EpsilonResult:
    """Epsilon of the sequential composition of ``runs``.

    Args:
        runs: (event, count) runs, e.g. from :func:`coalesce` or :func:`schedule`.
        delta: target delta in (0, 1).
        accountant: "pld" (tight; schedules fixed before the run) or "rdp".
        rdp_order: with "rdp", the single order of the privacy filter chosen before the run; None uses
            dp-accounting's default orders and the best of them (valid only for non-adaptive schedules).
    """
    check_accountant(accountant)
    check_delta(delta)
    num_events = sum(count for _, count in runs)
    if num_events == 0:
        return EpsilonResult(0.0, delta, accountant, rdp_order, None, 0)
    if accountant == "pld":
        if rdp_order is not None:
            raise ValueError("rdp_order is only meaningful with accountant='rdp'")
        key = tuple((e.sampling_rate, e.composed_noise_multiplier, count) for e, count in runs)
        eps, interval = _cached_pld_epsilon(key, delta)
        return EpsilonResult(eps, delta, "pld", None, interval, num_events)
    if rdp_order is not None:
        eps = rdp_epsilon_at_order(rdp_at_order(runs, order=rdp_order), order=rdp_order, delta=delta)
        return EpsilonResult(eps, delta, "rdp", float(rdp_order), None, num_events)
    acc = RdpAccountant()
    acc.compose(to_dp_event(runs))
    return EpsilonResult(float(acc.get_epsilon(delta)), delta, "rdp", None, None, num_events)


def schedule_epsilon(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    repeats: int = 1,
    accountant: str = "pld",
    rdp_order: float | None = None,
) -> EpsilonResult:
    """Epsilon of ``steps`` Poisson-sampled Gaussian releases, each repeated ``repeats`` times on its sample."""
    runs = schedule(
        noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps, repeats=repeats
    )
    return epsilon(runs, delta=delta, accountant=accountant, rdp_order=rdp_order)


def choose_rdp_order(runs: Sequence[EventRun], *, delta: float) -> float:
    """The RDP order that is optimal for a planned schedule: fix it before an adaptive run starts.

    The filter is valid for any order fixed in advance; picking the one that is best for the plan makes the
    adaptive run cost about what the plan would have cost. Plan with the most aggressive schedule the run may
    choose (a controller's lower sigma bound): at an order tuned for a larger sigma, the RDP of small-sigma steps
    grows very fast and the filter stops the run early.
    """
    check_delta(delta)
    if not runs:
        raise ValueError("choose_rdp_order needs a non-empty planned schedule")
    acc = RdpAccountant()
    acc.compose(to_dp_event(runs))
    _, order = acc.get_epsilon_and_optimal_order(delta)
    return float(order)

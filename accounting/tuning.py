"""Privacy cost of hyperparameter tuning: release only the best of a random number of private trials.

Papernot & Steinke 2022, "Hyperparameter Tuning with Renyi Differential Privacy" (ICLR; arXiv:2110.03620):
running a (lambda, eps)-RDP training K times, K random, and releasing only the best trial is

* Theorem 2 (K truncated negative binomial with shape eta and parameter gamma; eta = 1 is the geometric
  distribution, eta = 0 the logarithmic one): (lambda, eps')-RDP with
      eps' = eps(lambda) + (1 + eta) * (1 - 1/lambda_hat) * eps(lambda_hat)
             + (1 + eta) * log(1/gamma) / lambda_hat + log(E[K]) / (lambda - 1)
  for every lambda_hat >= 1 (we take the best lambda_hat);
* Theorem 6 (K Poisson with mean mu): if the trial is (eps_hat, delta_hat)-DP with
  exp(eps_hat) <= 1 + 1/(lambda - 1), then
      eps' = eps(lambda) + mu * delta_hat + log(mu) / (lambda - 1).

dp-accounting implements both as ``RepeatAndSelectDpEvent`` in its RDP accountant; we build on that rather than
re-deriving accountant math, and the tests check it against the theorems written out independently. The result is
(eps, delta)-DP via dp-accounting's RDP conversion. Publishing every trial instead costs their full composition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from accounting.accountants import EventRun, check_delta, to_dp_event

TrialDistribution = Literal["truncated_negative_binomial", "poisson"]
DISTRIBUTIONS: tuple[str, ...] = ("truncated_negative_binomial", "poisson")


@dataclass(frozen=True)
class TuningCost:
    """Epsilon of releasing the best of a random number of trials.

    Attributes:
        epsilon: epsilon of the tuned release at ``delta``.
        delta: delta.
        single_trial_epsilon: epsilon of one trial with the same accountant (RDP, same orders).
        mean_trials: E[K].
        distribution: "truncated_negative_binomial" or "poisson".
        shape: eta for the truncated negative binomial (1: geometric, 0: logarithmic); inf for Poisson.
        accountant: always "rdp" (the theorems are RDP statements).
        rdp_order: the optimal order of the conversion.
    """

    epsilon: float
    delta: float
    single_trial_epsilon: float
    mean_trials: float
    distribution: str
    shape: float
    accountant: str
    rdp_order: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tuning_epsilon(
    *,
    trial: dp_accounting.DpEvent | Sequence[EventRun],
    mean_trials: float,
    distribution: str,
    delta: float,
    shape: float = 1.0,
    orders: Sequence[float] | None = None,
) -> TuningCost:
    """Epsilon of running ``trial`` K times (K random with mean ``mean_trials``) and releasing only the best.

    Args:
        trial: one trial's mechanism: a DpEvent (e.g. ``Ledger.dp_event()``) or (event, count) runs.
        mean_trials: E[K] >= 1.
        distribution: "truncated_negative_binomial" (Theorem 2) or "poisson" (Theorem 6).
        delta: target delta in (0, 1).
        shape: eta >= 0 of the truncated negative binomial (1: geometric); ignored for Poisson.
        orders: RDP orders (default: dp-accounting's).
    """
    check_delta(delta)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if not (mean_trials >= 1.0) or math.isinf(mean_trials):
        raise ValueError(f"mean_trials must be a finite number >= 1, got {mean_trials}")
    if distribution == "poisson":
        shape = math.inf
    elif not (shape >= 0.0) or math.isinf(shape):
        raise ValueError(
            f"shape (eta) of the truncated negative binomial must be finite and >= 0, got {shape}"
        )
    event = trial if isinstance(trial, dp_accounting.DpEvent) else to_dp_event(trial)

    single = RdpAccountant(orders=orders)
    single.compose(event)
    tuned = RdpAccountant(orders=orders)
    tuned.compose(dp_accounting.dp_event.RepeatAndSelectDpEvent(event, float(mean_trials), float(shape)))
    eps, order = tuned.get_epsilon_and_optimal_order(delta)
    return TuningCost(
        epsilon=float(eps),
        delta=delta,
        single_trial_epsilon=float(single.get_epsilon(delta)),
        mean_trials=float(mean_trials),
        distribution=distribution,
        shape=float(shape),
        accountant="rdp",
        rdp_order=float(order),
    )

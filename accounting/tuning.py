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


# ---- repeat-and-select studies: a per-trial bound fixed before any trial, and the secret number of trials --------


def trial_rdp_bound(*, target_epsilon: float, delta: float, order: float) -> float:
    """The largest RDP at ``order`` that a trial run under an RDP privacy filter with budget (target_epsilon, delta)
    at that order can reach.

    Why a bound and not the trials' realized RDP: repeat-and-select releases the best of K draws of ONE mechanism
    Q = "draw a configuration theta from the search space, run it". Q's RDP is at most the largest RDP over every
    theta the search could draw (Renyi divergence is jointly quasi-convex), including configurations that were
    never run. A filter admits a release only while ``rdp_epsilon_at_order(total RDP) <= target_epsilon`` (see
    ``Ledger.admit``), so every theta's trial is (order, bound)-RDP whatever the search space does to its q, sigma or
    steps: the bound is fixed by the config before any trial, and the study's epsilon is known up front.

    Returns the bisection's upper end, so it is never below the exact supremum.
    """
    check_delta(delta)
    if not (target_epsilon > 0.0) or math.isinf(target_epsilon):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    if not (order > 1.0) or math.isinf(order):
        raise ValueError(f"order must be a finite number > 1, got {order}")
    from accounting.accountants import rdp_epsilon_at_order

    lo, hi = 0.0, max(1.0, target_epsilon)
    while rdp_epsilon_at_order(hi, order=order, delta=delta) <= target_epsilon:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if rdp_epsilon_at_order(mid, order=order, delta=delta) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def bound_event(*, rdp_bound: float, order: float) -> dp_accounting.DpEvent:
    """A Gaussian whose RDP at ``order`` is exactly ``rdp_bound`` (order / (2 sigma^2)): the per-trial mechanism
    the study accounts, as a dp-accounting event (the ledger's ``tuning`` event stores this sigma)."""
    if not (rdp_bound > 0.0) or math.isinf(rdp_bound):
        raise ValueError(f"rdp_bound must be a finite number > 0, got {rdp_bound}")
    return dp_accounting.GaussianDpEvent(math.sqrt(order / (2.0 * rdp_bound)))


def shape_of(distribution: str, shape: float | None) -> float:
    """dp-accounting's shape parameter: eta for the truncated negative binomial, inf for Poisson."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if distribution == "poisson":
        return math.inf
    if shape is None or not (shape >= 0.0) or math.isinf(shape):
        raise ValueError(f"shape (eta) of the truncated negative binomial must be finite and >= 0, got {shape}")
    return float(shape)


def repeat_and_select_epsilon(
    *, trial: dp_accounting.DpEvent, order: float, mean_trials: float, distribution: str, shape: float | None,
    delta: float,
) -> float:
    """Epsilon at ``delta`` of releasing only the best of K runs of ``trial`` (K random, mean ``mean_trials``),
    computed by dp-accounting's ``RepeatAndSelectDpEvent`` in an ``RdpAccountant`` at the single ``order`` of the
    trials' privacy filter (Papernot & Steinke Thm 2 with lambda_hat = lambda, or Thm 6)."""
    check_delta(delta)
    if not (mean_trials >= 1.0) or math.isinf(mean_trials):
        raise ValueError(f"mean_trials must be a finite number >= 1, got {mean_trials}")
    acc = RdpAccountant(orders=[float(order)])
    acc.compose(dp_accounting.dp_event.RepeatAndSelectDpEvent(trial, float(mean_trials),
                                                              shape_of(distribution, shape)))
    return float(acc.get_epsilon(delta))


def sample_num_trials(*, distribution: str, mean_trials: float, shape: float | None = None,
                      uniform: float | None = None) -> int:
    """Draw K, the number of trials, from SECRET randomness (OS entropy), as the theorems require: K is part of the
    mechanism, independent of the data and never published (a known K is best-of-K, which these bounds do not
    cover).

    truncated_negative_binomial: P(K = k) proportional to (1 - gamma)^k * binom(k + eta - 1, k), k >= 1 (eta = 0:
    proportional to (1 - gamma)^k / k), with gamma from dp-accounting so that E[K] = mean_trials. Poisson: K may be
    0, in which case nothing is released.

    Args:
        uniform: a number in [0, 1) to invert the CDF at, for tests; None draws one from OS entropy.
    """
    import secrets

    if not (mean_trials >= 1.0) or math.isinf(mean_trials):
        raise ValueError(f"mean_trials must be a finite number >= 1, got {mean_trials}")
    eta = shape_of(distribution, shape)
    u = secrets.SystemRandom().random() if uniform is None else float(uniform)
    if not 0.0 <= u < 1.0:
        raise ValueError(f"uniform must be in [0, 1), got {u}")
    if distribution == "poisson":
        k, p = 0, math.exp(-mean_trials)
        cdf = p
        while cdf <= u and p > 0.0:
            k += 1
            p *= mean_trials / k
            cdf += p
        return k
    from dp_accounting.rdp.rdp_privacy_accountant import _gamma_truncated_negative_binomial

    gamma = 1.0 if mean_trials == 1.0 else float(_gamma_truncated_negative_binomial(eta, mean_trials))
    if gamma >= 1.0:
        return 1
    weights = [1.0]  # unnormalized P(K = 1), P(K = 2), ...: w_{k+1} / w_k = (1 - gamma) (k + eta) / (k + 1)
    while weights[-1] > 1e-17 * sum(weights) or len(weights) < 2:
        k = len(weights)
        weights.append(weights[-1] * (1.0 - gamma) * (k + eta) / (k + 1))
    total, cdf = math.fsum(weights), 0.0
    for k, w in enumerate(weights, start=1):
        cdf += w / total
        if u < cdf:
            return k
    return len(weights)

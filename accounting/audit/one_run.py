"""One-run privacy audit (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023).

Protocol. Plant m canaries; canary i is included in the training data iff an independent fair coin S_i = +1
(S_i = -1: excluded). Train ONCE. Score every canary (a higher score means "looks included"), then guess
T_i in {+1, -1, 0}: +1 for the k_+ highest scores, -1 for the k_- lowest, 0 (abstain) for the rest; r = k_+ + k_-
guesses, of which v are correct (T_i = S_i).

Theorem (their Thm 5.2 / Algorithm 2). If training is (eps, delta)-DP with respect to adding or removing one
canary, then for every v

    P[V >= v] <= P[Binomial(r, p_eps) >= v] + 2 m delta * alpha,    p_eps = e^eps / (1 + e^eps),
    alpha = max_{i=1..v} P[v - i <= Binomial(r, p_eps) < v] / i .

So if that right-hand side (the p-value of eps) is below beta, eps is rejected at confidence 1 - beta, and the
audit's lower bound eps_lb is the largest eps rejected. With delta = 0 the bound is the exact binomial tail of
eps-randomized response: a correct guess is never more likely than e^eps / (1 + e^eps), however the canaries are
scored, which is why one run suffices (the m coins are independent draws of the same experiment).

Choosing k_+ and k_- after seeing the scores is multiple testing. :func:`audit_scores` takes k_+ and k_- fixed in
advance (the paper's practice for its headline numbers); :func:`audit_scores_best_of` tries a grid of G (k_+, k_-)
pairs chosen before the scores are seen and tests each at beta / G (Bonferroni), so the maximum over the grid is
still a valid lower bound at confidence 1 - beta.

Reading the number: eps_lb <= claimed eps is CONSISTENT with the guarantee, never a proof of it (the attack may be
weak). eps_lb > claimed eps at confidence 1 - beta means the claim is false unless a 1-in-(1/beta) event happened:
a bug in the mechanism or in its accounting.

Pure numpy/scipy (no torch, no Ray).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

EPS_SEARCH_TOL = 1e-6
"""Bisection stops when the bracket [eps_rejected, eps_not_rejected] is narrower than this."""
EPS_SEARCH_MAX = 100.0
"""No finite number of guesses rejects eps this large at any useful confidence (p_eps = 1 - 4e-44)."""


def _check_counts(m: int, r: int, v: int) -> None:
    for name, x in (("m", m), ("r", r), ("v", v)):
        if isinstance(x, bool) or int(x) != x:
            raise ValueError(f"{name} must be an integer, got {x!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (correct <= guesses <= canaries), got v={v}, r={r}, m={m}")


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of "the mechanism is (epsilon, delta)-DP" after v correct guesses out of r on m canaries.

    Steinke et al. 2023, Algorithm 2: P[Binomial(r, p) >= v] + 2 m delta alpha with p = e^eps / (1 + e^eps) and
    alpha = max_{1<=i<=v} P[v - i <= Binomial(r, p) < v] / i. Capped at 1.

    Raises:
        ValueError: on counts outside 0 <= v <= r <= m, epsilon < 0, or delta outside [0, 1].
    """
    _check_counts(m, r, v)
    if not epsilon >= 0.0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-randomized response
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    alpha = 0.0
    if v > 0 and delta > 0.0:
        i = np.arange(1, v + 1)  # [v]
        partial = np.cumsum(stats.binom.pmf(v - i, r, p))  # [v] P[v - i <= Bin < v]
        alpha = float(np.max(partial / i))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """Largest eps rejected at ``confidence``: the audit's lower bound eps_lb (0.0 when nothing is rejected).

    Bisection on eps as in the paper, keeping the invariant p_value(eps_lo) < beta <= p_value(eps_hi) and
    returning eps_lo, so rounding only ever lowers the bound.

    Raises:
        ValueError: on bad counts, delta, or a confidence outside (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) < beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, hi * 2.0
        if hi > EPS_SEARCH_MAX:
            return lo
    while hi - lo > EPS_SEARCH_TOL:
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


def draw_inclusion(m: int, *, seed: int) -> np.ndarray:
    """The m independent fair coins of the protocol as a bool array (True = canary included), seeded."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    return np.random.default_rng(seed).random(m) < 0.5  # [m]


def guesses_from_scores(scores: np.ndarray, *, k_pos: int, k_neg: int) -> np.ndarray:
    """Guesses in {+1, -1, 0}: +1 for the k_pos highest scores, -1 for the k_neg lowest, 0 elsewhere.

    Ties are broken by index (a stable sort), never by the hidden labels.

    Raises:
        ValueError: on non-finite scores, negative k, or k_pos + k_neg > m.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per canary), got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (a nan/inf score would be ranked arbitrarily)")
    m = scores.shape[0]
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(
            f"need k_pos, k_neg >= 0 and k_pos + k_neg <= m={m}, got k_pos={k_pos}, k_neg={k_neg}"
        )
    order = np.argsort(-scores, kind="stable")  # [m] highest first
    guesses = np.zeros(m, dtype=np.int64)
    guesses[order[:k_pos]] = 1
    if k_neg:
        guesses[order[m - k_neg :]] = -1
    return guesses


@dataclass(frozen=True)
class OneRunResult:
    """One audit's outcome, with everything needed to recompute eps_lb.

    Attributes:
        epsilon_lb: the lower bound on eps at ``confidence`` (0.0 when nothing is rejected).
        confidence: 1 - beta, the probability the bound holds for an (eps, delta)-DP mechanism.
        delta: the delta of the null hypothesis (the claim's delta).
        num_canaries: m.
        num_guesses: r = k_pos + k_neg.
        num_correct: v.
        k_pos: positive guesses (highest scores).
        k_neg: negative guesses (lowest scores).
        num_candidates: size G of the (k_pos, k_neg) grid searched (1 = fixed in advance); each candidate was
            tested at beta / G.
    """

    epsilon_lb: float
    confidence: float
    delta: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    k_pos: int
    k_neg: int
    num_candidates: int = 1

    def flags(self, claimed_epsilon: float) -> bool:
        """True when the audit refutes the claim: eps_lb > claimed eps at this confidence."""
        return self.epsilon_lb > claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_labels(scores: np.ndarray, included: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included)
    if included.dtype != np.bool_:
        raise ValueError(f"included must be a bool array (the canary coins), got dtype {included.dtype}")
    if scores.shape != included.shape:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must have the same shape")
    return scores, included


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    k_pos: int,
    k_neg: int,
    delta: float,
    confidence: float,
    num_candidates: int = 1,
) -> OneRunResult:
    """eps_lb from canary scores with (k_pos, k_neg) fixed before the scores were seen.

    ``num_candidates`` > 1 tests at beta / num_candidates (used by :func:`audit_scores_best_of`).
    """
    scores, included = _check_labels(scores, included)
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    guesses = guesses_from_scores(scores, k_pos=k_pos, k_neg=k_neg)  # [m]
    truth = np.where(included, 1, -1)  # [m]
    v = int(np.sum(guesses == truth))
    m, r = scores.shape[0], k_pos + k_neg
    beta = (1.0 - confidence) / num_candidates
    eps_lb = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=1.0 - beta)
    return OneRunResult(
        epsilon_lb=eps_lb,
        confidence=confidence,
        delta=delta,
        num_canaries=m,
        num_guesses=r,
        num_correct=v,
        k_pos=k_pos,
        k_neg=k_neg,
        num_candidates=num_candidates,
    )


def default_candidates(m: int) -> list[tuple[int, int]]:
    """A grid of (k_pos, k_neg) fixed before any score is seen: k in {m/64 ... m/2} by powers of two, positive
    only and symmetric. Positive-only guesses matter for subsampled mechanisms, where an included canary that was
    never sampled is indistinguishable from an excluded one and negative guesses are near chance.
    """
    ks = sorted({max(1, m // d) for d in (64, 32, 16, 8, 4, 2)})
    grid = [(k, 0) for k in ks] + [(k // 2, k // 2) for k in ks if k >= 2]
    return sorted(set(grid))


def audit_scores_best_of(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    candidates: Sequence[tuple[int, int]] | None,
    delta: float,
    confidence: float,
) -> OneRunResult:
    """The best eps_lb over a grid of (k_pos, k_neg) fixed in advance, each tested at beta / G (Bonferroni).

    ``candidates=None`` uses :func:`default_candidates`. The union bound makes P[any candidate's bound is wrong]
    <= G * beta / G = beta, so the maximum is a valid lower bound at ``confidence``.
    """
    scores, included = _check_labels(scores, included)
    grid = default_candidates(scores.shape[0]) if candidates is None else list(candidates)
    if not grid:
        raise ValueError("candidates must name at least one (k_pos, k_neg) pair")
    results = [
        audit_scores(
            scores, included, k_pos=kp, k_neg=kn, delta=delta, confidence=confidence, num_candidates=len(grid)
        )
        for kp, kn in grid
    ]
    return max(results, key=lambda res: res.epsilon_lb)

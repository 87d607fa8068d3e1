"""Membership-inference statistics: AUC with a DeLong confidence interval, and TPR at a fixed FPR.

Scores follow one convention everywhere in dpalign's audits: HIGHER means "more likely a member" (a loss-based
attack passes minus the loss). AUC = P[score(member) > score(non-member)] + 1/2 P[tie] (Mann-Whitney).

Confidence interval: DeLong, DeLong & Clarke-Pearson (1988), computed with midranks in O(n log n) (Sun & Xu
2014), on the logit scale so the interval stays inside (0, 1) and is not degenerate near 0 or 1. Deterministic:
no bootstrap seed to pick.

Pure numpy/scipy (no torch, no Ray).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class AucResult:
    """An attack's AUC and its confidence interval.

    Attributes:
        auc: Mann-Whitney AUC; 0.5 is chance.
        low: lower end of the interval.
        high: upper end of the interval.
        confidence: two-sided coverage of [low, high].
        num_members: members scored.
        num_nonmembers: non-members scored.
        method: how the interval was computed ("delong-logit").
    """

    auc: float
    low: float
    high: float
    confidence: float
    num_members: int
    num_nonmembers: int
    method: str = "delong-logit"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_scores(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"{name}: need at least 2 scores for an interval, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: scores must be finite")
    return x


def auc_with_ci(
    member_scores: np.ndarray, nonmember_scores: np.ndarray, *, confidence: float = 0.95
) -> AucResult:
    """AUC of separating members from non-members by score, with a DeLong interval (logit scale).

    Raises:
        ValueError: on fewer than 2 scores per side, non-finite scores, or confidence outside (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = _as_scores(member_scores, "member_scores")  # [n1]
    y = _as_scores(nonmember_scores, "nonmember_scores")  # [n0]
    n1, n0 = x.size, y.size
    rank_all = stats.rankdata(np.concatenate([x, y]))  # [n1 + n0] midranks
    rank_x, rank_y = stats.rankdata(x), stats.rankdata(y)
    auc = (rank_all[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    # Structural components: v10[i] = P[y < x_i] (+ties/2), v01[j] = P[x > y_j] (+ties/2).
    v10 = (rank_all[:n1] - rank_x) / n0  # [n1]
    v01 = 1.0 - (rank_all[n1:] - rank_y) / n1  # [n0]
    var = np.var(v10, ddof=1) / n1 + np.var(v01, ddof=1) / n0
    z = stats.norm.ppf(0.5 + confidence / 2.0)
    clipped = min(max(auc, 0.5 / (n1 * n0)), 1.0 - 0.5 / (n1 * n0))  # keep the logit finite at 0 or 1
    logit = math.log(clipped / (1.0 - clipped))
    # Delta method: se(logit AUC) = se(AUC) / (AUC (1 - AUC)); a zero variance (perfect separation) falls back to
    # the variance of a single discordant pair so the interval never collapses to a point.
    se = math.sqrt(max(var, clipped * (1.0 - clipped) / (n1 * n0))) / (clipped * (1.0 - clipped))
    low = 1.0 / (1.0 + math.exp(-(logit - z * se)))
    high = 1.0 / (1.0 + math.exp(-(logit + z * se)))
    # At perfect (or perfectly wrong) separation the clipped logit would leave the estimate outside its interval.
    low, high = min(low, float(auc)), max(high, float(auc))
    return AucResult(
        auc=float(auc), low=low, high=high, confidence=confidence, num_members=n1, num_nonmembers=n0
    )


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, *, fpr: float) -> float:
    """Fraction of members scored strictly above the (1 - fpr) quantile of the non-members (the threshold that
    flags at most ``fpr`` of non-members). The low-FPR regime is where a membership attack matters.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    x = _as_scores(member_scores, "member_scores")
    y = np.sort(_as_scores(nonmember_scores, "nonmember_scores"))
    # Threshold at the k-th largest non-member score with k = floor(fpr * n0): at most k non-members lie above it.
    k = int(math.floor(fpr * y.size))
    threshold = y[y.size - 1 - k] if k < y.size else -np.inf
    return float(np.mean(x > threshold))


def max_auc_under_dp(epsilon: float, delta: float) -> float:
    """The largest AUC any test of ONE user's membership can reach against an (epsilon, delta)-DP mechanism.

    Kairouz, Oh & Viswanath (2015): every such test has TPR <= min(1, e^eps FPR + delta,
    1 - e^-eps (1 - delta - FPR)) at every FPR; the area under that curve (piecewise linear, integrated exactly
    at its breakpoints) bounds the AUC: e^eps / (1 + e^eps) when delta = 0 (0.73 at eps=1, 0.98 at eps=4).
    """
    if not epsilon >= 0.0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if math.isinf(epsilon):
        return 1.0
    e = math.exp(epsilon)
    # Breakpoints of the three lines' lower envelope: where two of them cross, clipped to [0, 1].
    knots = {0.0, 1.0, (1.0 - delta) / e, (1.0 - delta) / (1.0 + e), 1.0 - delta}
    xs = np.array(sorted(k for k in knots if 0.0 <= k <= 1.0))
    ys = np.minimum.reduce([np.ones_like(xs), e * xs + delta, 1.0 - (1.0 - delta - xs) / e])
    ys = np.maximum(ys, 0.0)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))

"""Canary exposure (Carlini, Liu, Erlingsson, Kos & Song, "The Secret Sharer", USENIX Security 2019).

A secret s is drawn uniformly from a candidate space R (e.g. "my PIN is ____" with 10^4 fillings) and planted in a
user's training data. After training, rank every candidate by the model's log-perplexity (lower = more likely);
rank(s) is 1 + the number of candidates strictly more likely than s. Then

    exposure(s) = log2 |R| - log2 rank(s)          in [0, log2 |R|].

Exposure near log2 |R| means the secret is the model's top guess (memorized); a secret the model never saw has
expected rank ~|R|/2, i.e. exposure ~1.

When R is too large to enumerate, rank / |R| is estimated from n random candidates: the fraction of them strictly
more likely than s, smoothed (k + 1) / (n + 1) so a secret beaten by none is not given infinite exposure; that
caps the estimate at log2(n + 1) bits. Beyond that, Carlini et al. extrapolate by fitting a skew-normal to the
candidates' log-perplexities and reading its CDF at the secret: :func:`exposure_extrapolated`.

Pure numpy/scipy (no torch, no Ray).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def _candidates(candidate_log_perplexities: np.ndarray) -> np.ndarray:
    c = np.asarray(candidate_log_perplexities, dtype=np.float64).ravel()
    if c.size == 0:
        raise ValueError("need at least one candidate log-perplexity")
    if not np.all(np.isfinite(c)):
        raise ValueError("candidate log-perplexities must be finite")
    return c


def exposure_exact(secret_log_perplexity: float, candidate_log_perplexities: np.ndarray) -> float:
    """log2 |R| - log2 rank with R = the candidates given (they must be ALL of R, the secret included).

    Raises:
        ValueError: when the secret's log-perplexity is not among the candidates' (R must contain the secret).
    """
    c = _candidates(candidate_log_perplexities)
    if not math.isfinite(secret_log_perplexity):
        raise ValueError(f"secret log-perplexity must be finite, got {secret_log_perplexity}")
    if not np.any(c == secret_log_perplexity):
        raise ValueError(
            "the candidate space must include the secret itself (its log-perplexity was not found)"
        )
    rank = 1 + int(np.sum(c < secret_log_perplexity))
    return math.log2(c.size) - math.log2(rank)


def exposure_sampled(secret_log_perplexity: float, candidate_log_perplexities: np.ndarray) -> float:
    """Exposure estimated from n random candidates (the secret excluded): -log2((k + 1) / (n + 1)) where k of them
    are strictly more likely than the secret. At most log2(n + 1): more bits need more candidates or
    :func:`exposure_extrapolated`.
    """
    c = _candidates(candidate_log_perplexities)
    if not math.isfinite(secret_log_perplexity):
        raise ValueError(f"secret log-perplexity must be finite, got {secret_log_perplexity}")
    k = int(np.sum(c < secret_log_perplexity))
    return -math.log2((k + 1) / (c.size + 1))


def exposure_extrapolated(secret_log_perplexity: float, candidate_log_perplexities: np.ndarray) -> float:
    """Carlini et al.'s extrapolation: -log2 F(secret) with F a skew-normal fitted to the candidates.

    Needs enough candidates for a stable fit (at least 100).
    """
    c = _candidates(candidate_log_perplexities)
    if c.size < 100:
        raise ValueError(f"need at least 100 candidates to fit the skew-normal, got {c.size}")
    shape, loc, scale = stats.skewnorm.fit(c)
    log_cdf = float(stats.skewnorm.logcdf(secret_log_perplexity, shape, loc=loc, scale=scale))
    return max(0.0, -log_cdf / math.log(2.0))

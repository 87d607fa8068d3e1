"""Confidence intervals the evaluation and the report share (imports nothing of the project)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% Student-t confidence interval ``(mean, lo, hi)``.

    Uses the sample standard deviation (ddof=1) and t quantile with n-1 degrees of freedom; with all values equal
    the interval collapses to the mean.

    Raises:
        ValueError: fewer than 2 values or a non-finite value (no interval exists).
    """
    from scipy import stats

    xs = [float(v) for v in values]
    n = len(xs)
    if n < 2:
        raise ValueError(f"mean_ci95 needs at least 2 values, got {n}")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError("mean_ci95: values must be finite")
    mean = math.fsum(xs) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def ci_entry(values: Sequence[float]) -> dict[str, float | int]:
    """``{"mean", "lo", "hi", "n"}`` of :func:`mean_ci95` (the schema's interval object)."""
    mean, lo, hi = mean_ci95(values)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(values)}

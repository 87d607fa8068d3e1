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


def ratio_ci95(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float | int | None]:
    """Ratio of two independent sample means with Fieller's 95% interval: ``{"mean", "lo", "hi", "n"}``.

    Why Fieller and not the delta method: with 3 seeds the denominator's interval can come close to 0 (a gain
    measured over few runs), and then the ratio's interval is honestly unbounded; the delta method would still print
    a finite, too-narrow interval. The t quantile uses min(n_num, n_den) - 1 degrees of freedom (conservative).
    ``lo``/``hi`` are None when the interval is not a finite segment (the denominator is not significantly
    different from 0).

    Raises:
        ValueError: fewer than 2 values on either side, a non-finite value, or a zero mean denominator.
    """
    from scipy import stats

    a = [float(v) for v in numerators]
    b = [float(v) for v in denominators]
    if min(len(a), len(b)) < 2:
        raise ValueError("ratio_ci95 needs at least 2 values on each side")
    if not all(math.isfinite(x) for x in a + b):
        raise ValueError("ratio_ci95: values must be finite")
    ma, mb = math.fsum(a) / len(a), math.fsum(b) / len(b)
    if mb == 0.0:
        raise ValueError("ratio_ci95: the denominators' mean is 0")
    va = math.fsum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = math.fsum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    t2 = float(stats.t.ppf(0.975, min(len(a), len(b)) - 1)) ** 2
    # (ma - r mb)^2 = t^2 (va + r^2 vb)  <=>  (mb^2 - t^2 vb) r^2 - 2 ma mb r + (ma^2 - t^2 va) = 0
    qa, qb, qc = mb * mb - t2 * vb, -2.0 * ma * mb, ma * ma - t2 * va
    disc = qb * qb - 4.0 * qa * qc
    lo = hi = None
    if qa > 0.0 and disc >= 0.0:
        root = math.sqrt(disc)
        lo, hi = (-qb - root) / (2.0 * qa), (-qb + root) / (2.0 * qa)
    return {"mean": ma / mb, "lo": lo, "hi": hi, "n": min(len(a), len(b))}

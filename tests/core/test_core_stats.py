"""Confidence intervals of dpalign.stats: the mean interval and Fieller's interval of a ratio of means."""

from __future__ import annotations

import math
import random

import pytest

from dpalign.stats import mean_ci95, ratio_ci95


def test_ratio_ci_brackets_the_ratio_and_matches_the_mean_interval_when_the_denominator_is_exact() -> None:
    num = [0.20, 0.25, 0.18, 0.22]
    den = [0.25, 0.25, 0.25]  # no spread: Fieller reduces to the numerator's t interval divided by the constant
    out = ratio_ci95(num, den)
    m, lo, hi = mean_ci95(num)
    assert out["mean"] == pytest.approx(m / 0.25)
    # df = min(4, 3) - 1 = 2 here, wider than the numerator's own df = 3 interval
    assert out["lo"] < lo / 0.25 and out["hi"] > hi / 0.25
    assert out["lo"] < out["mean"] < out["hi"]


def test_ratio_ci_is_unbounded_when_the_denominator_is_not_significantly_nonzero() -> None:
    out = ratio_ci95([0.1, 0.12, 0.11], [0.05, -0.04, 0.02])
    assert out["lo"] is None and out["hi"] is None
    assert out["mean"] == pytest.approx(0.11 / (0.03 / 3))


def test_ratio_ci_covers_the_true_ratio_about_95_percent_of_the_time() -> None:
    rng = random.Random(0)
    hits = trials = 0
    for _ in range(2000):
        a = [rng.gauss(0.8, 0.1) for _ in range(3)]
        b = [rng.gauss(1.0, 0.1) for _ in range(3)]
        out = ratio_ci95(a, b)
        if out["lo"] is None:
            continue
        trials += 1
        hits += out["lo"] <= 0.8 <= out["hi"]
    assert trials > 1900
    assert 0.94 <= hits / trials <= 0.995  # conservative df: at least nominal coverage


def test_ratio_ci_refuses_what_has_no_interval() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ratio_ci95([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        ratio_ci95([1.0, math.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="mean is 0"):
        ratio_ci95([1.0, 2.0], [1.0, -1.0])

"""The audit statistics: one-run bound (against a literal transcription of the paper's Algorithm 2, closed forms,
and a coverage simulation), AUC with DeLong interval, exposure, and the Poisson-sampler check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from accounting.audit.exposure import exposure_exact, exposure_extrapolated, exposure_sampled
from accounting.audit.mia import auc_with_ci, tpr_at_fpr
from accounting.audit.one_run import (
    audit_scores,
    audit_scores_best_of,
    default_candidates,
    draw_inclusion,
    epsilon_lower_bound,
    guesses_from_scores,
    p_value,
)
from accounting.audit.sampling import poisson_inclusion_test


def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke, Nasr & Jagielski 2023, Algorithm 2, as a plain loop (the reference)."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize(
    "m,r,v,eps,delta",
    [
        (1000, 100, 90, 1.0, 1e-5),
        (1000, 500, 400, 1.3, 1e-6),
        (200, 200, 130, 0.2, 1e-3),
        (50, 10, 0, 2.0, 0.01),
    ],
)
def test_p_value_matches_paper_algorithm(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) == pytest.approx(
        _paper_p_value(m, r, v, eps, delta), rel=1e-10, abs=1e-15
    )


def test_pure_dp_is_binomial_tail_of_randomized_response() -> None:
    eps = 1.5
    p = math.exp(eps) / (1 + math.exp(eps))
    assert p_value(m=300, r=300, v=250, epsilon=eps, delta=0.0) == pytest.approx(stats.binom.sf(249, 300, p))


def test_all_correct_closed_form() -> None:
    # delta = 0, v = r: p_eps^r = beta  =>  eps = logit(beta^(1/r)).
    r, beta = 100, 0.05
    p = beta ** (1 / r)
    expected = math.log(p / (1 - p))
    assert epsilon_lower_bound(m=r, r=r, v=r, delta=0.0, confidence=1 - beta) == pytest.approx(
        expected, abs=1e-5
    )


def test_bound_is_the_rejection_boundary_and_monotone() -> None:
    m, r, delta, beta = 1000, 400, 1e-6, 0.05
    previous = -1.0
    for v in range(200, 401, 20):
        eps = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=1 - beta)
        assert eps >= previous
        previous = eps
        if eps > 0:
            assert p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) < beta
            assert p_value(m=m, r=r, v=v, epsilon=eps + 1e-5, delta=delta) >= beta
    assert previous > 3.0


def test_chance_guessing_gives_zero_and_delta_lowers_the_bound() -> None:
    assert epsilon_lower_bound(m=1000, r=1000, v=500, delta=0.0, confidence=0.95) == 0.0
    assert epsilon_lower_bound(m=1000, r=1000, v=520, delta=0.0, confidence=0.95) == 0.0  # within noise
    pure = epsilon_lower_bound(m=1000, r=200, v=190, delta=0.0, confidence=0.95)
    approx = epsilon_lower_bound(m=1000, r=200, v=190, delta=1e-4, confidence=0.95)
    assert 0 < approx < pure


def test_bad_counts_fail_early() -> None:
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(m=10, r=11, v=3, epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(m=10, r=10, v=3, delta=0.0, confidence=1.0)


def test_bound_is_valid_for_randomized_response() -> None:
    """Coverage: a mechanism that IS eps0-DP (randomized response on each coin, the worst case the theorem
    allows) is refuted in at most ~beta of the runs; and the bound has power (it gets near eps0)."""
    eps0, m, beta, trials = 1.0, 400, 0.1, 200
    rng = np.random.default_rng(7)
    p = math.exp(eps0) / (1 + math.exp(eps0))
    bounds = []
    for _ in range(trials):
        v = int(rng.binomial(m, p))
        bounds.append(epsilon_lower_bound(m=m, r=m, v=v, delta=0.0, confidence=1 - beta))
    bounds_arr = np.array(bounds)
    assert np.mean(bounds_arr > eps0) <= beta + 3 * math.sqrt(beta * (1 - beta) / trials)
    assert np.median(bounds_arr) > 0.6 * eps0


def test_guesses_top_and_bottom_with_stable_ties() -> None:
    scores = np.array([0.1, 5.0, 3.0, 3.0, -2.0, 0.0])
    g = guesses_from_scores(scores, k_pos=2, k_neg=1)
    assert g.tolist() == [0, 1, 1, 0, -1, 0]  # tie 3.0/3.0 broken by index
    with pytest.raises(ValueError, match="finite"):
        guesses_from_scores(np.array([np.nan, 1.0]), k_pos=1, k_neg=0)
    with pytest.raises(ValueError, match="k_pos"):
        guesses_from_scores(scores, k_pos=5, k_neg=2)


def test_audit_scores_counts_and_best_of_is_bonferroni() -> None:
    m = 1000
    included = draw_inclusion(m, seed=3)
    scores = np.random.default_rng(4).normal(size=m) + 1.5 * included
    res = audit_scores(scores, included, k_pos=100, k_neg=100, delta=1e-6, confidence=0.95)
    g = guesses_from_scores(scores, k_pos=100, k_neg=100)
    assert res.num_correct == int(np.sum(g == np.where(included, 1, -1)))
    assert res.num_guesses == 200 and res.epsilon_lb > 1.0
    grid = default_candidates(m)
    best = audit_scores_best_of(scores, included, candidates=None, delta=1e-6, confidence=0.95)
    assert best.num_candidates == len(grid)
    each = [
        epsilon_lower_bound(
            m=m,
            r=kp + kn,
            v=audit_scores(scores, included, k_pos=kp, k_neg=kn, delta=1e-6, confidence=0.95).num_correct,
            delta=1e-6,
            confidence=1 - 0.05 / len(grid),
        )
        for kp, kn in grid
    ]
    assert best.epsilon_lb == pytest.approx(max(each))
    # Scores unrelated to the coins: no evidence.
    null = audit_scores_best_of(
        np.random.default_rng(5).normal(size=m), included, candidates=None, delta=1e-6, confidence=0.95
    )
    assert null.epsilon_lb < 0.3


def test_auc_against_pairwise_count_and_coverage() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=37) + 0.5, np.concatenate([rng.normal(size=40), [0.5, 0.5]])
    x[:3] = 0.5  # ties across the classes
    pairs = (x[:, None] > y[None, :]).mean() + 0.5 * (x[:, None] == y[None, :]).mean()
    res = auc_with_ci(x, y)
    assert res.auc == pytest.approx(pairs)
    assert res.low < res.auc < res.high
    d, hits, trials = 1.0, 0, 300
    truth = stats.norm.cdf(d / math.sqrt(2))
    for _ in range(trials):
        r = auc_with_ci(rng.normal(size=60) + d, rng.normal(size=60), confidence=0.9)
        hits += r.low <= truth <= r.high
    assert abs(hits / trials - 0.9) < 0.06
    perfect = auc_with_ci(np.arange(10.0) + 100, np.arange(10.0))
    assert perfect.auc == 1.0 and 0.5 < perfect.low < 1.0 and perfect.high == 1.0


def test_tpr_at_fpr() -> None:
    y = np.arange(100.0)  # non-members
    x = np.array([98.5, 99.5, 50.0, 200.0])
    # fpr 1%: one non-member (99) may lie above the threshold 98, so 98.5, 99.5 and 200 count.
    assert tpr_at_fpr(x, y, fpr=0.01) == pytest.approx(0.75)
    # fpr 0.1% < 1/100: no non-member may lie above, threshold 99: only 99.5 and 200.
    assert tpr_at_fpr(x, y, fpr=0.001) == pytest.approx(0.5)


def test_exposure() -> None:
    cands = np.array([3.0, 1.0, 2.0, 5.0, 4.0, 6.0, 7.0, 8.0])
    assert exposure_exact(1.0, cands) == pytest.approx(3.0)  # rank 1 of 8
    assert exposure_exact(8.0, cands) == pytest.approx(0.0)  # rank 8 of 8
    with pytest.raises(ValueError, match="include the secret"):
        exposure_exact(0.5, cands)
    rng = np.random.default_rng(1)
    sample = rng.normal(size=1023)
    assert exposure_sampled(-10.0, sample) == pytest.approx(10.0)  # beaten by none: log2(1024)
    assert exposure_sampled(10.0, sample) == pytest.approx(0.0)
    big = rng.normal(size=20000)
    assert exposure_extrapolated(-3.0, big) == pytest.approx(-math.log2(stats.norm.cdf(-3.0)), abs=0.4)


def test_poisson_check_separates_poisson_from_shuffling() -> None:
    rng = np.random.default_rng(2)
    steps, users, q = 200, 400, 0.1
    poisson = rng.random((steps, users)) < q
    ok = poisson_inclusion_test(poisson, sampling_rate=q)
    assert not ok.rejects_poisson() and 0.6 < ok.batch_size_variance_ratio < 1.6
    shuffled = np.zeros((steps, users), dtype=bool)
    per_epoch = int(round(1 / q))
    for epoch in range(steps // per_epoch):
        perm = rng.permutation(users)
        for b, chunk in enumerate(np.array_split(perm, per_epoch)):
            shuffled[epoch * per_epoch + b, chunk] = True
    bad = poisson_inclusion_test(shuffled, sampling_rate=q)
    assert bad.rejects_poisson() and bad.batch_size_variance_ratio < 0.01

"""Stage composition mode from user ids, and the Papernot-Steinke tuning cost checked against the theorems."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

from accounting.accountants import schedule, to_dp_event
from accounting.composition import (
    OverlappingStagesError,
    check_composition_claim,
    composition_mode,
    user_set_fingerprint,
)
from accounting.tuning import tuning_epsilon

DELTA = 1e-5


def test_composition_mode_from_user_ids():
    assert composition_mode({"sft": ["a", "b"], "rm": ["c"], "ppo": ["d", "e"]}) == ("parallel", 0)
    assert composition_mode({"sft": ["a", "b", "c"], "rm": ["c", "b"], "ppo": ["b"]}) == ("sequential", 2)


def test_parallel_claim_over_overlapping_users_names_the_count():
    users = {"sft": ["u1", "u2", "u3"], "rm": ["u3", "u4"], "ppo": ["u2", "u5"]}
    with pytest.raises(OverlappingStagesError, match="2 users appear in more than one stage") as info:
        check_composition_claim("parallel", users)
    assert info.value.overlap == 2 and info.value.pairs == {("ppo", "sft"): 1, ("rm", "sft"): 1}
    assert check_composition_claim("sequential", users) == "sequential"
    assert check_composition_claim("sequential", {"a": ["x"], "b": ["y"]}) == "sequential"


def test_fingerprint_is_order_and_duplicate_invariant():
    assert user_set_fingerprint(["b", "a", "a"]) == user_set_fingerprint(["a", "b"])
    assert user_set_fingerprint(["a", "b"]) != user_set_fingerprint(["a", "c"])
    assert user_set_fingerprint([]).startswith("sha256:")


# ---- tuning: the theorems written out independently of dp-accounting's implementation ------------------------


def _single_rdp(trial):
    acc = RdpAccountant(orders=DEFAULT_RDP_ORDERS)
    acc.compose(trial)
    return np.array(DEFAULT_RDP_ORDERS, dtype=float), acc.rdp


def _to_eps(orders, rdp, delta):
    """Textbook conversion eps = rdp + log(1/delta)/(lambda-1) (Mironov 2017), looser than dp-accounting's."""
    return float(np.min(rdp + math.log(1 / delta) / (orders - 1)))


def _theorem2_geometric(orders, rdp, mean):
    """Papernot & Steinke 2022, Theorem 2 with eta = 1 (geometric, gamma = 1/mean), best lambda_hat."""
    eta, gamma = 1.0, 1.0 / mean
    c = (1 + eta) * np.min((1 - 1 / orders) * rdp + math.log(1 / gamma) / orders)
    out = rdp + c + math.log(mean) / (orders - 1)
    return np.minimum.accumulate(out[::-1])[::-1]  # RDP is monotone in the order


def _theorem6_poisson(orders, rdp, mu):
    """Theorem 6: eps' = eps(lambda) + mu*delta_hat + log(mu)/(lambda-1), exp(eps_hat) = 1 + 1/(lambda-1).

    delta_hat from the textbook bound delta = exp((l'-1)(rdp(l') - eps_hat)) minimised over l'.
    """
    out = []
    for lam, r in zip(orders, rdp, strict=True):
        eps_hat = math.log1p(1 / (lam - 1))
        delta_hat = float(np.min(np.exp(np.minimum((orders - 1) * (rdp - eps_hat), 0.0))))
        out.append(r + mu * delta_hat + math.log(mu) / (lam - 1))
    return np.array(out)


TRIAL = to_dp_event(schedule(noise_multiplier=1.0, sampling_rate=0.01, steps=1000))


def test_geometric_matches_theorem_2():
    orders, rdp = _single_rdp(TRIAL)
    cost = tuning_epsilon(
        trial=TRIAL, mean_trials=10, distribution="truncated_negative_binomial", shape=1.0, delta=DELTA
    )
    ours = _theorem2_geometric(orders, rdp, 10)
    # dp-accounting's conversion is tighter than the textbook one; both use the same RDP curve.
    assert cost.epsilon <= _to_eps(orders, ours, DELTA)
    acc = RdpAccountant(orders=DEFAULT_RDP_ORDERS)
    from dp_accounting.dp_event import RepeatAndSelectDpEvent

    acc.compose(RepeatAndSelectDpEvent(TRIAL, 10.0, 1.0))
    np.testing.assert_allclose(acc.rdp, ours, rtol=1e-9)


def test_poisson_within_theorem_6():
    orders, rdp = _single_rdp(TRIAL)
    cost = tuning_epsilon(trial=TRIAL, mean_trials=10, distribution="poisson", delta=DELTA)
    assert cost.shape == math.inf and cost.accountant == "rdp"
    assert cost.epsilon <= _to_eps(orders, _theorem6_poisson(orders, rdp, 10), DELTA)


@pytest.mark.parametrize("distribution", ["truncated_negative_binomial", "poisson"])
def test_tuning_costs_more_than_one_run_and_grows_with_mean(distribution):
    costs = [
        tuning_epsilon(trial=TRIAL, mean_trials=m, distribution=distribution, delta=DELTA).epsilon
        for m in (2, 5, 20, 100)
    ]
    single = tuning_epsilon(trial=TRIAL, mean_trials=2, distribution=distribution, delta=DELTA)
    assert all(c > single.single_trial_epsilon for c in costs)
    assert costs == sorted(costs) and costs[0] < costs[-1]
    # Far cheaper than publishing all 100 trials (full composition).
    all_trials = to_dp_event(schedule(noise_multiplier=1.0, sampling_rate=0.01, steps=100 * 1000))
    acc = RdpAccountant()
    acc.compose(all_trials)
    assert costs[-1] < acc.get_epsilon(DELTA)


def test_pure_dp_limit_recovers_liu_talwar_three_epsilon():
    """Constant RDP eps (pure eps-DP) with geometric K: Theorem 2 tends to 3 eps + log(E[K])/(lambda-1)."""
    orders = np.array([2.0, 10.0, 100.0, 1000.0, 1e5])
    eps = 0.5
    out = _theorem2_geometric(orders, np.full_like(orders, eps), mean=10)
    assert out[-1] == pytest.approx(3 * eps, abs=0.01)


def test_tuning_bad_input():
    with pytest.raises(ValueError, match="mean_trials"):
        tuning_epsilon(trial=TRIAL, mean_trials=0.5, distribution="poisson", delta=DELTA)
    with pytest.raises(ValueError, match="distribution"):
        tuning_epsilon(trial=TRIAL, mean_trials=3, distribution="uniform", delta=DELTA)

"""The budget layer: adversarial proposals never push epsilon past the target, and every planned step runs."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounting.accountants import schedule_epsilon
from controller.budget import BudgetExhausted, BudgetGuard

proposals = st.one_of(
    st.floats(min_value=1e-6, max_value=1e6),
    st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e-12]),
)


def _fresh_epsilon(guard: BudgetGuard) -> float:
    """Recompute epsilon from the guard's events alone with a fresh dp-accounting accountant."""
    acc = RdpAccountant(orders=[guard.rdp_order])
    acc.compose(dp_accounting.ComposedDpEvent([e.to_dp_event() for e in guard.events]))
    return float(acc.get_epsilon(guard.delta))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    target=st.floats(min_value=0.3, max_value=8.0),
    q=st.floats(min_value=0.005, max_value=0.5),
    steps=st.integers(min_value=1, max_value=12),
    actions=st.lists(proposals, min_size=12, max_size=12),
    refuse_above=st.one_of(st.none(), st.floats(min_value=0.0, max_value=50.0)),
)
def test_adversarial_proposals_never_exceed_target(target, q, steps, actions, refuse_above):
    def admit(
        event,
    ):  # an adversarial filter: refuses everything above a threshold except the floor's own step
        return (
            refuse_above is None
            or event.noise_multiplier <= refuse_above
            or event.noise_multiplier == guard.floor()
        )

    guard = BudgetGuard(
        target_epsilon=target,
        delta=1e-5,
        sampling_rate=q,
        steps=steps,
        max_noise_multiplier=500.0,
        admit=admit,
    )
    for t in range(steps):
        action = guard.safe_action(clip_norms=[1.0, 2.0], sigma=actions[t])
        assert action.noise_multiplier >= action.floor
        guard.record(guard.event(action.noise_multiplier))
        assert guard.epsilon_spent() <= target
    assert guard.steps_done == steps
    assert _fresh_epsilon(guard) <= target * (1 + 1e-9)
    with pytest.raises(BudgetExhausted):
        guard.safe_action(clip_norms=[1.0], sigma=1.0)


def test_floor_is_tight_and_matches_fixed_schedule():
    guard = BudgetGuard(target_epsilon=2.0, delta=1e-5, sampling_rate=0.05, steps=50)
    floor = guard.floor()
    # The floor spends the budget (within the bisection tolerance) and 1% less noise would not fit.
    assert guard.affordable(floor) and not guard.affordable(floor * 0.99)
    rdp_eps = schedule_epsilon(
        noise_multiplier=floor,
        sampling_rate=0.05,
        steps=50,
        delta=1e-5,
        accountant="rdp",
        rdp_order=guard.rdp_order,
    ).epsilon
    assert 1.9 < rdp_eps <= 2.0


def test_spending_more_noise_now_lowers_future_floors():
    guard = BudgetGuard(target_epsilon=2.0, delta=1e-5, sampling_rate=0.05, steps=20)
    f0 = guard.floor()
    for _ in range(5):
        guard.record(guard.event(3 * f0))
    assert guard.floor() < f0 * 0.99


def test_external_spending_exhausts_with_clear_error():
    guard = BudgetGuard(target_epsilon=1.0, delta=1e-5, sampling_rate=0.1, steps=10, max_noise_multiplier=5.0)
    for _ in range(200):
        guard.record(
            guard.event(0.5, step=0).__class__(
                stage="x", step=0, purpose="metric", sampling_rate=0.1, noise_multiplier=0.5
            )
        )
    with pytest.raises(BudgetExhausted, match="steps left"):
        guard.floor()


def test_state_dict_round_trip():
    guard = BudgetGuard(target_epsilon=2.0, delta=1e-5, sampling_rate=0.05, steps=20)
    for s in (1.0, 2.0, 5.0):
        guard.record(guard.event(s))
    other = BudgetGuard(
        target_epsilon=2.0, delta=1e-5, sampling_rate=0.05, steps=20, rdp_order=guard.rdp_order
    )
    other.load_state_dict(guard.state_dict())
    assert other.steps_done == 3 and other.floor() == guard.floor()
    assert other.epsilon_spent() == guard.epsilon_spent()


def test_last_step_spends_the_remaining_budget():
    guard = BudgetGuard(target_epsilon=2.0, delta=1e-5, sampling_rate=0.05, steps=10)
    for _ in range(9):
        guard.record(guard.event(guard.safe_action(clip_norms=[1.0], sigma=50.0).noise_multiplier))
    last = guard.safe_action(clip_norms=[1.0], sigma=50.0)  # a timid proposal would waste the budget
    assert last.noise_multiplier == last.floor < 50.0
    guard.record(guard.event(last.noise_multiplier))
    assert 2.0 * 0.99 < guard.epsilon_spent() <= 2.0

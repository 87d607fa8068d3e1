"""Calibration never overshoots, is near-tight, and the budget split composes within the total."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accounting.accountants import epsilon, schedule, schedule_epsilon
from accounting.calibration import (
    CalibrationError,
    StageSchedule,
    calibrate_noise_multiplier,
    split_budget,
)

DELTA = 1e-5


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibration_meets_target_without_overshoot_and_is_tight(accountant):
    cal = calibrate_noise_multiplier(
        target_epsilon=4.0, delta=DELTA, sampling_rate=0.01, steps=10000, accountant=accountant
    )
    again = schedule_epsilon(
        noise_multiplier=cal.noise_multiplier,
        sampling_rate=0.01,
        steps=10000,
        delta=DELTA,
        accountant=accountant,
    )
    assert again.epsilon == cal.epsilon <= 4.0
    # Tight: 0.2% less noise already exceeds the target.
    below = schedule_epsilon(
        noise_multiplier=cal.noise_multiplier * 0.998,
        sampling_rate=0.01,
        steps=10000,
        delta=DELTA,
        accountant=accountant,
    )
    assert below.epsilon > 4.0


def test_pld_needs_less_noise_than_rdp():
    kw = dict(target_epsilon=2.0, delta=DELTA, sampling_rate=0.02, steps=2000)
    assert (
        calibrate_noise_multiplier(**kw).noise_multiplier
        < calibrate_noise_multiplier(**kw, accountant="rdp").noise_multiplier
    )


@settings(max_examples=4, deadline=None)
@given(
    target=st.floats(0.3, 10.0),
    q=st.floats(0.002, 0.1),
    steps=st.integers(10, 2000),
    k=st.integers(1, 4),
)
def test_calibration_never_overshoots(target, q, steps, k):
    cal = calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sampling_rate=q, steps=steps, repeats=k, accountant="rdp"
    )
    assert cal.epsilon <= target
    assert (
        schedule_epsilon(
            noise_multiplier=cal.noise_multiplier,
            sampling_rate=q,
            steps=steps,
            repeats=k,
            delta=DELTA,
            accountant="rdp",
        ).epsilon
        <= target
    )


def test_repeats_calibrate_to_sqrt_k_times_the_noise():
    one = calibrate_noise_multiplier(
        target_epsilon=3.0, delta=DELTA, sampling_rate=0.01, steps=1000, accountant="rdp"
    )
    four = calibrate_noise_multiplier(
        target_epsilon=3.0, delta=DELTA, sampling_rate=0.01, steps=1000, repeats=4, accountant="rdp"
    )
    assert four.noise_multiplier / math.sqrt(4) == pytest.approx(one.noise_multiplier, rel=3e-3)


def test_unreachable_target_is_an_error():
    with pytest.raises(CalibrationError, match="even noise multiplier 5"):
        calibrate_noise_multiplier(
            target_epsilon=0.01, delta=DELTA, sampling_rate=1.0, steps=1000, max_noise_multiplier=5.0
        )


@pytest.mark.parametrize("bad", [dict(target_epsilon=0.0), dict(target_epsilon=-1.0), dict(delta=0.0)])
def test_bad_targets(bad):
    args = dict(target_epsilon=1.0, delta=DELTA, sampling_rate=0.01, steps=10) | bad
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(**args)


def test_budget_split_composes_within_total():
    schedules = {
        "sft": StageSchedule(0.02, 500),
        "rm": StageSchedule(0.05, 200),
        "ppo": StageSchedule(0.01, 300, 2),
    }
    shares = {"sft": 0.3, "rm": 0.2, "ppo": 0.5}
    cals = split_budget(
        total_epsilon=4.0, total_delta=DELTA, shares=shares, schedules=schedules, accountant="rdp"
    )
    for name, cal in cals.items():
        assert cal.epsilon <= 4.0 * shares[name] and cal.delta == pytest.approx(DELTA * shares[name])
    runs = [
        run
        for name, s in schedules.items()
        for run in schedule(
            noise_multiplier=cals[name].noise_multiplier,
            sampling_rate=s.sampling_rate,
            steps=s.steps,
            repeats=s.repeats,
        )
    ]
    composed = epsilon(runs, delta=DELTA, accountant="rdp").epsilon
    assert composed <= 4.0


def test_budget_split_rejects_bad_shares():
    sch = {"a": StageSchedule(0.1, 10), "b": StageSchedule(0.1, 10)}
    with pytest.raises(ValueError, match="sum to 1"):
        split_budget(total_epsilon=1, total_delta=DELTA, shares={"a": 0.5, "b": 0.6}, schedules=sch)
    with pytest.raises(ValueError, match="name stages"):
        split_budget(total_epsilon=1, total_delta=DELTA, shares={"a": 1.0}, schedules=sch)


@pytest.mark.parametrize("k, sigma_b, z_grad", [(1, 2.0, 1.0), (3, 1.5, 0.8), (12, 4.0, 2.0)])
def test_clip_count_cost_is_a_group_of_sensitivity_one_half(k, sigma_b, z_grad):
    """Derived independently of accounting.mechanisms' own formula: K centred clip counts (each moved by 1/2 by
    one user) with noise std sigma_b are K extra groups with C = 1/2 and s = sigma_b, next to a gradient group
    with multiplier z_grad (C = 1, s = z_grad)."""
    from accounting.mechanisms import (
        adaptive_clipping_multiplier,
        effective_noise_multiplier,
        grad_noise_for_target,
    )

    as_groups = effective_noise_multiplier(clip_norms=[1.0] + [0.5] * k, noise_stds=[z_grad] + [sigma_b] * k)
    got = adaptive_clipping_multiplier(grad_noise_multiplier=z_grad, count_noise_std=sigma_b, num_counts=k)
    assert got == pytest.approx(as_groups, rel=1e-12)
    assert grad_noise_for_target(target_multiplier=got, count_noise_std=sigma_b, num_counts=k) == pytest.approx(z_grad)

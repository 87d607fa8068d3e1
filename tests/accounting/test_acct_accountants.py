"""Accountants against dp-accounting called directly, published numbers, and the docs/design.md K-repeats example."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from accounting.accountants import (
    choose_rdp_order,
    coalesce,
    epsilon,
    schedule,
    schedule_epsilon,
)
from accounting.events import PrivacyEvent
from accounting.mechanisms import effective_noise_multiplier

DELTA = 1e-5


def _direct(q: float, sigma: float, steps: int, accountant: str) -> float:
    """Independent call: dp-accounting's own accountant at its default settings, no dpalign code involved."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    acc = PLDAccountant() if accountant == "pld" else RdpAccountant()
    return acc.compose(event).get_epsilon(DELTA)


# (q, sigma, steps): the q=0.04/sigma=1.5/2250 steps, the Abadi et al. MNIST setting
# (q=256/60000, sigma=1.1, 60 epochs), and the CLI example.
STANDARD = [(0.04, 1.5, 2250), (256 / 60000, 1.1, 60 * 60000 // 256), (0.01, 1.1, 10000)]


@pytest.mark.parametrize("q,sigma,steps", STANDARD)
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_matches_dp_accounting_within_one_percent(q, sigma, steps, accountant):
    ours = schedule_epsilon(
        noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=DELTA, accountant=accountant
    )
    ref = _direct(q, sigma, steps, accountant)
    assert ours.accountant == accountant
    # Both are pessimistic (upper) bounds; our grid is coarser for large eps and finer for small eps.
    assert ours.epsilon == pytest.approx(ref, rel=0.01)


def test_published_values():
    # Abadi et al. 2016 report eps ~ 2 for this MNIST setting with the moments accountant (their delta 1e-5);
    # Opacus' RDP accountant (same RDP math) gives ~2.6 with integer+fractional orders. PLD is tighter still.
    rdp = schedule_epsilon(
        noise_multiplier=1.1, sampling_rate=256 / 60000, steps=14062, delta=DELTA, accountant="rdp"
    )
    pld = schedule_epsilon(noise_multiplier=1.1, sampling_rate=256 / 60000, steps=14062, delta=DELTA)
    assert rdp.epsilon == pytest.approx(2.60, abs=0.05)
    assert pld.epsilon == pytest.approx(2.39, abs=0.05)
    # The issue's example q=0.04, sigma=1.5, 2250 steps: pinned to dp-accounting 0.6's RDP value 7.33.
    assert schedule_epsilon(
        noise_multiplier=1.5, sampling_rate=0.04, steps=2250, delta=DELTA, accountant="rdp"
    ).epsilon == pytest.approx(7.33, abs=0.02)


def test_design_k_repeats_example():
    """docs/design.md: q=0.01, sigma=1, 1000 batches, K=4 epochs on each sample: eps ~ 15.5, not ~ 4.1 (RDP numbers)."""
    right = schedule_epsilon(
        noise_multiplier=1.0, sampling_rate=0.01, steps=1000, repeats=4, delta=DELTA, accountant="rdp"
    )
    wrong = schedule_epsilon(
        noise_multiplier=1.0, sampling_rate=0.01, steps=4000, delta=DELTA, accountant="rdp"
    )
    assert right.epsilon == pytest.approx(15.5, abs=0.1)
    assert wrong.epsilon == pytest.approx(4.1, abs=0.05)
    # The same relation holds under PLD: reuse of a sample is far more expensive than fresh samples.
    right_pld = schedule_epsilon(noise_multiplier=1.0, sampling_rate=0.01, steps=1000, repeats=4, delta=DELTA)
    wrong_pld = schedule_epsilon(noise_multiplier=1.0, sampling_rate=0.01, steps=4000, delta=DELTA)
    assert right_pld.epsilon > 3 * wrong_pld.epsilon


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_repeats_cost_exactly_a_gaussian_of_sigma_over_sqrt_k(accountant):
    k = 3
    repeated = schedule_epsilon(
        noise_multiplier=1.2, sampling_rate=0.02, steps=300, repeats=k, delta=DELTA, accountant=accountant
    ).epsilon
    single = schedule_epsilon(
        noise_multiplier=1.2 / math.sqrt(k), sampling_rate=0.02, steps=300, delta=DELTA, accountant=accountant
    ).epsilon
    once = schedule_epsilon(
        noise_multiplier=1.2, sampling_rate=0.02, steps=300, delta=DELTA, accountant=accountant
    ).epsilon
    assert repeated == single
    assert repeated > once


def test_sqrt_k_trap_of_per_group_noise_is_caught():
    """Per-group noise s_k = sigma * C_k over K groups is sigma/sqrt(K), and the ledger charges that."""
    clips = [1.0, 1.0, 1.0, 1.0]
    per_group = effective_noise_multiplier(clip_norms=clips, noise_stds=[1.0 * c for c in clips])
    isotropic = effective_noise_multiplier(clip_norms=clips, noise_stds=[1.0 * math.hypot(*clips)] * 4)
    assert isotropic == pytest.approx(1.0)
    assert per_group == pytest.approx(0.5)
    honest = schedule_epsilon(noise_multiplier=per_group, sampling_rate=0.01, steps=500, delta=DELTA).epsilon
    naive = schedule_epsilon(noise_multiplier=1.0, sampling_rate=0.01, steps=500, delta=DELTA).epsilon
    assert honest > 2 * naive


def test_coalesce_runs_and_order():
    def ev(step, sigma, stage="sft"):
        return PrivacyEvent(
            stage=stage, step=step, purpose="gradient", sampling_rate=0.01, noise_multiplier=sigma
        )

    runs = coalesce([ev(0, 1.0), ev(1, 1.0), ev(2, 2.0), ev(3, 1.0), ev(4, 2.0, "rm")])
    assert [(e.noise_multiplier, n) for e, n in runs] == [(1.0, 2), (2.0, 1), (1.0, 1), (2.0, 1)]
    # Coalesced history costs the same as the event-by-event composition (dp-accounting directly).
    events = [ev(i, 1.0 + 0.5 * (i // 5)) for i in range(20)]
    direct = RdpAccountant()
    for e in events:
        direct.compose(e.to_dp_event())
    assert epsilon(coalesce(events), delta=DELTA, accountant="rdp").epsilon == pytest.approx(
        direct.get_epsilon(DELTA), rel=1e-12
    )


def test_pld_tighter_than_rdp_and_filter_order_is_valid_bound():
    runs = schedule(noise_multiplier=1.0, sampling_rate=0.01, steps=2000)
    pld = epsilon(runs, delta=DELTA, accountant="pld").epsilon
    rdp = epsilon(runs, delta=DELTA, accountant="rdp").epsilon
    order = choose_rdp_order(runs, delta=DELTA)
    at_order = epsilon(runs, delta=DELTA, accountant="rdp", rdp_order=order)
    assert pld <= rdp
    assert at_order.rdp_order == order and at_order.epsilon == pytest.approx(rdp, rel=1e-9)
    assert epsilon(runs, delta=DELTA, accountant="rdp", rdp_order=2.0).epsilon > rdp


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(accountant="prv"), "accountant"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(accountant="pld", rdp_order=8.0), "rdp_order"),
        (dict(accountant="rdp", rdp_order=1.0), "rdp_order"),
    ],
)
def test_bad_arguments_fail_early(kwargs, match):
    args = dict(delta=DELTA, accountant="pld") | kwargs
    with pytest.raises(ValueError, match=match):
        epsilon(schedule(noise_multiplier=1.0, sampling_rate=0.1, steps=3), **args)


_sigma = st.floats(0.6, 3.0)
_q = st.floats(0.001, 0.2)
_steps = st.integers(1, 400)
_k = st.integers(1, 4)


@settings(max_examples=8, deadline=None)
@given(sigma=_sigma, q=_q, steps=_steps, k=_k, factor=st.floats(1.05, 2.0))
def test_monotone_in_sigma_q_steps_and_k(sigma, q, steps, k, factor):
    def eps(**over):
        args = dict(
            noise_multiplier=sigma, sampling_rate=q, steps=steps, repeats=k, delta=DELTA, accountant="rdp"
        )
        return schedule_epsilon(**(args | over)).epsilon

    base = eps()
    # 1e-3 relative: dp-accounting's subsampled-Gaussian RDP is not exactly monotone in sigma where epsilon is huge
    # (found: sigma 0.60 -> 0.64 at q=0.125, 54 steps, K=4 gave 124.59 > 124.51); no calibration lives there.
    slack = 1e-3 * base
    assert eps(noise_multiplier=sigma * factor) <= base + slack
    assert eps(sampling_rate=min(1.0, q * factor)) >= base - slack
    assert eps(steps=steps + 1) >= base - slack
    assert eps(repeats=k + 1) >= base - slack


@settings(max_examples=5, deadline=None)
@given(sigma=_sigma, q=_q, steps=st.integers(1, 300), k=st.integers(1, 3))
def test_pld_never_above_rdp(sigma, q, steps, k):
    args = dict(noise_multiplier=sigma, sampling_rate=q, steps=steps, repeats=k, delta=DELTA)
    assert schedule_epsilon(**args).epsilon <= schedule_epsilon(**args, accountant="rdp").epsilon * (1 + 1e-9)


@pytest.mark.parametrize(
    "q,sigma,steps",
    [
        (0.001, 1.0, 1000),
        (0.01, 4.0, 10000),
        (0.01, 2.0, 1000),
        (0.1, 5.0, 100),
        (0.2, 0.8, 50),
        (1.0, 5.0, 10),
    ],
)
def test_pld_discretization_within_one_percent_of_default_grid(q, sigma, steps):
    ours = schedule_epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=DELTA).epsilon
    ref = _direct(q, sigma, steps, "pld")
    assert ours == pytest.approx(ref, rel=0.01)


def test_cached_pld_composition_equals_pld_accountant():
    """The filter's cached PLD path and dp-accounting's PLDAccountant give the same number on the same grid."""
    from accounting.accountants import pld_epsilon, to_dp_event

    runs = [
        (PrivacyEvent(stage="s", step=0, purpose="gradient", sampling_rate=0.02, noise_multiplier=1.0), 30),
        (PrivacyEvent(stage="s", step=30, purpose="metric", sampling_rate=1.0, noise_multiplier=8.0), 2),
        (
            PrivacyEvent(
                stage="s", step=32, purpose="gradient", sampling_rate=0.02, noise_multiplier=1.3, repeats=2
            ),
            1,
        ),
    ]
    ours = epsilon(runs, delta=DELTA)
    ref, interval = pld_epsilon(to_dp_event(runs), delta=DELTA)
    assert ours.pld_discretization == interval and ours.epsilon == pytest.approx(ref, rel=1e-9)

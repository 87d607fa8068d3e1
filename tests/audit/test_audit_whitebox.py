"""White-box one-run audits of the REAL DPEngine: the correct engine is not flagged, every planted bug is.

False positives: for a correct engine the one-run bound exceeds the true epsilon with probability at most
1 - confidence = 5% (Steinke et al. 2023, Thm 5.2), and the claimed (pessimistic PLD) epsilon is at least the true
one, so each correct-engine test below fails with probability <= 5% over seeds; at the fixed seeds used it is
deterministic. The slow test measures the rate over seeds in the audit's most powerful regime.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from accounting.accountants import schedule_epsilon
from accounting.audit.sampling import poisson_inclusion_test
from launch.config import ConfigError, load_config
from trainers.audit.planted import PlantedBug, ShuffledUserSampler, buggy_engine_factory
from trainers.audit.whitebox import WhiteboxAuditConfig, run_whitebox_audit
from trainers.engine import PoissonUserSampler

# sigma = 4 with q = 1 and one step claims eps ~ 1.06 at delta = 1e-6: modest, so that bugs amplify it a lot.
BASE = WhiteboxAuditConfig(num_canaries=1000, num_groups=4, noise_multiplier=4.0, delta=1e-6, seed=0)
# PPO: K = 64 releases of one q = 0.1 sample at sigma = 2 (true eps ~ 22) counted as 64 fresh events (~2.2).
PPO = WhiteboxAuditConfig(
    num_canaries=5000, num_groups=1, sampling_rate=0.1, repeats=64, noise_multiplier=2.0, delta=1e-6, seed=0
)


def test_correct_engine_not_flagged_and_claim_is_the_schedule() -> None:
    res = run_whitebox_audit(BASE)
    assert res.num_events == 1
    expected = schedule_epsilon(noise_multiplier=4.0, sampling_rate=1.0, steps=1, delta=1e-6).epsilon
    assert res.claimed.epsilon == pytest.approx(expected)
    assert not res.flagged, res.verdict
    assert "consistent" in res.verdict


def test_correct_engine_audit_has_power_without_being_flagged() -> None:
    """At sigma = 1 the canaries are clearly visible: eps_lb is far above 0 yet below the claim."""
    res = run_whitebox_audit(WhiteboxAuditConfig(noise_multiplier=1.0, seed=1))
    assert not res.flagged, res.verdict
    assert res.audit.epsilon_lb > 1.0


def test_correct_engine_subsampled_with_repeats_not_flagged() -> None:
    cfg = WhiteboxAuditConfig(
        num_canaries=1000, sampling_rate=0.5, steps=3, repeats=2, noise_multiplier=2.0, seed=2
    )
    res = run_whitebox_audit(cfg)
    assert res.num_events == 3  # one event per sample, repeats=2 each
    expected = schedule_epsilon(
        noise_multiplier=2.0, sampling_rate=0.5, steps=3, repeats=2, delta=1e-6
    ).epsilon
    assert res.claimed.epsilon == pytest.approx(expected)
    assert not res.flagged, res.verdict
    assert res.audit.epsilon_lb > 0.0


@pytest.mark.parametrize(
    "bug,config,factor",
    [
        (PlantedBug.CLIPPING_DISABLED, BASE, 8.0),  # canary norm 8 C passes unclipped: 8x the signal
        (PlantedBug.NOISE_SCALED_DOWN, BASE, 8.0),
        (PlantedBug.INDEPENDENT_WORKER_NOISE, BASE, 64.0),  # 64 workers: std sigma/8
        (PlantedBug.NOISE_DIVIDED_TWICE, BASE, 8.0),
        (PlantedBug.SQRT_K_TRAP, WhiteboxAuditConfig(num_groups=32, seed=0), 8.0),  # sigma/sqrt(32)
        (PlantedBug.PPO_EPOCHS_AS_FRESH, PPO, 8.0),
    ],
    ids=lambda x: x.name if isinstance(x, PlantedBug) else "",
)
def test_planted_bug_is_flagged(bug: PlantedBug, config: WhiteboxAuditConfig, factor: float) -> None:
    res = run_whitebox_audit(config, engine_factory=buggy_engine_factory(bug, factor=factor))
    assert res.flagged, f"{bug.name} not caught: {res.verdict}"
    assert res.verdict.startswith("FLAGGED")


def test_ppo_epochs_correct_accounting_is_not_flagged_and_fresh_accounting_understates() -> None:
    fresh = schedule_epsilon(noise_multiplier=2.0, sampling_rate=0.1, steps=64, delta=1e-6).epsilon
    correct = schedule_epsilon(
        noise_multiplier=2.0, sampling_rate=0.1, steps=1, repeats=64, delta=1e-6
    ).epsilon
    assert fresh < 0.2 * correct
    # The real engine on the same schedule (fewer canaries: only the event and the verdict are checked).
    res = run_whitebox_audit(replace(PPO, num_canaries=500))
    assert res.num_events == 1 and res.claimed.epsilon == pytest.approx(correct)
    assert not res.flagged, res.verdict


def test_shuffled_batches_fail_the_poisson_check_and_the_engine_sampler_passes() -> None:
    """The one-run audit lacks power against shuffling at certifiable epsilons: test the sampler itself."""
    n, q, steps = 500, 0.1, 100

    def membership(sampler: object) -> torch.Tensor:
        rows = torch.zeros(steps, n, dtype=torch.bool)
        for t in range(steps):
            rows[t, sampler.sample(t)] = True  # type: ignore[attr-defined]
        return rows

    poisson = poisson_inclusion_test(
        membership(PoissonUserSampler(n, sampling_rate=q, seed=3)).numpy(), sampling_rate=q
    )
    assert not poisson.rejects_poisson(), poisson
    shuffled = poisson_inclusion_test(
        membership(ShuffledUserSampler(n, sampling_rate=q, seed=3)).numpy(), sampling_rate=q
    )
    assert shuffled.rejects_poisson(), shuffled


def test_shuffle_sampler_is_a_partition_per_epoch() -> None:
    sampler = ShuffledUserSampler(103, sampling_rate=0.25, seed=0)
    epoch = torch.cat([sampler.sample(t) for t in range(4)])
    assert sorted(epoch.tolist()) == list(range(103))


def test_bad_bug_arguments() -> None:
    with pytest.raises(ValueError, match="factor"):
        buggy_engine_factory(PlantedBug.NOISE_SCALED_DOWN, factor=1.0)
    build = buggy_engine_factory(PlantedBug.SHUFFLED_AS_POISSON)
    with pytest.raises(ValueError, match="ShuffledUserSampler"):
        build(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="canary_norm_factor"):
        run_whitebox_audit(WhiteboxAuditConfig(canary_norm_factor=0.5))
    with pytest.raises(ConfigError, match="sampling_rate"):
        load_config(WhiteboxAuditConfig, None, ["sampling_rate=1.5"])


@pytest.mark.slow
def test_false_positive_rate_over_seeds() -> None:
    """Correct engine, 20 seeds, sigma = 1 (the audit's strongest regime): flagged at most ~5% of the time."""
    flagged = sum(
        run_whitebox_audit(WhiteboxAuditConfig(noise_multiplier=1.0, seed=s)).flagged for s in range(20)
    )
    assert flagged <= 3  # P[Binomial(20, 0.05) >= 4] < 1.6%

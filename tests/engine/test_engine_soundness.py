"""The guarantee's preconditions, checked as an auditor would: secret noise, released sensitivities, row mapping.

* Secret noise: an adversary who knows the public config regenerates the noise of a release and subtracts it.
  Against a reproducible (public) seed that recovers the clipped sum exactly; against the default secret seed it
  must recover nothing better than the noise itself.
* Sensitivity: add one user to a batch, release both with the same noise, and measure how far every released
  quantity moved (the noise cancels) against the sensitivity the accountant assumed: each group's gradient sum by
  at most C_k, each clip count by at most 1/2, and the whole release by at most 1/sigma_eff in noise units.
"""

from __future__ import annotations

import math

import pytest
import torch

from accounting.mechanisms import effective_noise_multiplier
from tests.engine import engine_helpers as H
from trainers.audit.sensitivity import add_one_user_shift
from trainers.engine import (
    AdaptiveClippingPolicy,
    DPEngine,
    FixedPolicy,
    PerLayerFixedPolicy,
    PoissonUserSampler,
    UserBatch,
)
from trainers.engine.per_user import stacked_copies
from trainers.engine.sampling import NoiseSeed, release_generator


class _Replay:
    """A policy that plans ``plan`` at every step (the real policies' plans, released by the real engine)."""

    def __init__(self, plan):
        self._plan = plan

    def plan(self, step, groups):
        return self._plan

    def observe(self, released):
        pass


def _batch(user_counts: list[int], seed: int = 0) -> UserBatch:
    records, users = H.lm_records(user_counts, seed=seed)
    return UserBatch(records=records, user_ids=users)


def _release(model, policy, batch: UserBatch, *, seed, num_users: int = 20, q: float = 0.5):
    """One private release; returns (noisy sums per tensor times B, noisy counts or None, the engine)."""
    out: list[list[torch.Tensor]] = []
    engine = DPEngine(model, stage="sft", sampling_rate=q, num_users=num_users, seed=seed, policy=policy,
                      event_sink=lambda e: None, check_weights_move=False, check_record_independence=False)
    engine.apply_fn = lambda grads: out.append([g.detach().clone() for g in grads])
    result = engine.step(batch, H.lm_loss(model))
    b = engine.expected_batch_size
    return [g * b for g in out[0]], result.released.noisy_unclipped_counts, engine, result


# ---- 1. the noise is secret ---------------------------------------------------------------------------------


def _attack_residual(seed) -> tuple[float, float]:
    """Regenerate the noise from the PUBLIC seed 0 and subtract it: distance to the true clipped sum, and the norm
    of the noise that was actually added (the attack's yardstick)."""
    model = H.lora_lm()
    policy = FixedPolicy(noise_multiplier=2.0, clip_norm=0.5)
    batch = _batch([2, 1, 3, 1])
    noisy, _, engine, _ = _release(model, policy, batch, seed=seed)
    plan = policy.plan(0, engine.groups)
    _, per_user = engine.per_user_gradients(batch, H.lm_loss(model))
    clipped, _, _ = engine.clip_and_sum(per_user, plan.clip_norms)
    gen = release_generator(0, 0, kind="noise")  # what anyone holding config.yaml can compute
    guessed = [plan.noise_stds[engine.group_of_param[i]] * gen.normal(s.shape) for i, s in enumerate(noisy)]
    residual = math.sqrt(sum(float((n - g - c).pow(2).sum()) for n, g, c in zip(noisy, guessed, clipped, strict=True)))
    noise = math.sqrt(sum(float((n - c).pow(2).sum()) for n, c in zip(noisy, clipped, strict=True)))
    return residual, noise


def test_public_seed_noise_is_subtracted_exactly_which_is_why_it_is_not_the_default():
    residual, noise = _attack_residual(0)  # reproducible mode keyed by the public seed 0
    assert noise > 1.0
    assert residual < 1e-4 * noise


@pytest.mark.parametrize("secure_rng", [False, True])
def test_regenerate_and_subtract_attack_fails_against_the_secret_seed(secure_rng):
    residual, noise = _attack_residual(NoiseSeed.draw(secure_rng=secure_rng))
    # Subtracting an independent guess adds noise instead of removing it: the residual is ~ sqrt(2) x the noise.
    assert residual > 1.2 * noise


def test_default_engine_draws_a_secret_and_refuses_one_per_rank():
    model = H.lora_lm()
    policy = FixedPolicy(noise_multiplier=1.0, clip_norm=0.5)
    engine = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, policy=policy, event_sink=lambda e: None)
    assert engine.seed.secret and engine.seed.value.bit_length() > 128
    assert "<secret>" in repr(engine.seed) and str(engine.seed.value) not in repr(engine.seed)
    with pytest.raises(ValueError, match="SAME secret"):
        DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, policy=policy, event_sink=lambda e: None,
                 reduce_fn=lambda ts: None)


def test_two_secret_seeds_give_different_samples_and_noise_a_reproducible_seed_the_same():
    a, b = NoiseSeed.draw(), NoiseSeed.draw()
    sa, sb = PoissonUserSampler(200, sampling_rate=0.5, seed=a), PoissonUserSampler(200, sampling_rate=0.5, seed=b)
    assert not torch.equal(sa.sample(0), sb.sample(0))
    r1, r2 = NoiseSeed.reproducible(3), NoiseSeed.reproducible(3)
    assert torch.equal(PoissonUserSampler(200, sampling_rate=0.5, seed=r1).sample(4),
                       PoissonUserSampler(200, sampling_rate=0.5, seed=r2).sample(4))
    assert torch.equal(release_generator(r1, 2, kind="noise").normal((50,)),
                       release_generator(3, 2, kind="noise").normal((50,)))


def test_secure_rng_draws_standard_normals_and_uniform_inclusion():
    """SHAKE-256 stream: N(0, 1) by a chi-square and a mean test; Poisson inclusion at rate q."""
    gen = release_generator(NoiseSeed.draw(secure_rng=True), 0, kind="noise")
    x = torch.cat([gen.normal((20_000,), dtype=torch.float64), gen.normal((5, 1000), dtype=torch.float64).flatten()])
    n = x.numel()
    assert abs((float(x.pow(2).sum()) - n) / math.sqrt(2 * n)) < 5
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    sampler = PoissonUserSampler(4000, sampling_rate=0.1, seed=NoiseSeed.draw(secure_rng=True))
    counts = [sampler.sample(t).numel() for t in range(5)]
    assert abs(sum(counts) - 2000) < 5 * math.sqrt(2000 * 0.9)


# ---- 2. every released quantity moves by at most its accounted sensitivity -------------------------------------


def _policies(groups):
    k = len(groups)
    yield "fixed", FixedPolicy(noise_multiplier=1.0, clip_norm=0.3)
    yield "per_layer", PerLayerFixedPolicy(noise_multiplier=1.0, clip_norms=[0.3 / math.sqrt(k)] * k)
    yield "adaptive", AdaptiveClippingPolicy(noise_multiplier=1.0, initial_clip_norm=0.3, count_noise_std=1.5)
    from controller.config import ControllerConfig
    from controller.policy import LearnedController

    cfg = ControllerConfig(enabled=True, count_noise_std=2.0)
    yield "controller", LearnedController(config=cfg, target_epsilon=8.0, delta=1e-5, sampling_rate=0.5, steps=4,
                                          validation_loss=lambda: 1.0, rdp_order=8.0, stage="sft")


def _scaled(plan, scale):
    """The plan with thresholds and noise divided by ``scale`` (same sigma_eff): 1e-3 leaves the added user
    unclipped in every group (its clip bit is 1), 1e3 clips it in every group (bit 0, gradient shift = C_k)."""
    return type(plan)(clip_norms=tuple(c / scale for c in plan.clip_norms),
                      noise_stds=tuple(s / scale for s in plan.noise_stds), count_noise_std=plan.count_noise_std)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_adding_one_user_moves_every_release_by_at_most_its_accounted_sensitivity(scale):
    groups = DPEngine(H.lora_lm(), stage="sft", sampling_rate=0.5, num_users=20, seed=0, policy=FixedPolicy(
        noise_multiplier=1.0, clip_norm=1.0), event_sink=lambda e: None).groups
    extra_records, _ = H.lm_records([2], seed=9)
    extra = UserBatch(records=extra_records, user_ids=torch.full((2,), 99, dtype=torch.int64))
    checked = {}
    for name, real in _policies(groups):
        plan = _scaled(real.plan(0, groups), scale)
        result = add_one_user_shift(H.lora_lm, plan, _batch([2, 1, 3, 1]), extra, H.lm_loss, num_users=20, seed=7)
        assert result.violations() == [], (name, result)
        if scale > 1:  # clipped everywhere: the gradient bound is attained, so the measure is not vacuous
            assert min(result.grad_shift) == pytest.approx(1.0, rel=1e-3), (name, result.grad_shift)
        checked[name] = result.count_shift
    assert list(checked) == ["fixed", "per_layer", "adaptive", "controller"]
    assert checked["adaptive"] and checked["controller"]  # the count-releasing policies were covered
    assert all(c == pytest.approx(0.5) for c in checked["adaptive"])  # centred: b - 1/2, never the raw bit


def test_sensitivity_audit_flags_raw_clip_counts_accounted_as_centred():
    """The planted RAW_CLIP_COUNTS engine (dpalign's own bug before the fix) fails the audit deterministically."""
    from trainers.audit.planted import PlantedBug, buggy_engine_factory

    policy = AdaptiveClippingPolicy(noise_multiplier=1.0, initial_clip_norm=0.3, count_noise_std=1.5)
    groups = DPEngine(H.lora_lm(), stage="sft", sampling_rate=0.5, num_users=20, seed=0, policy=policy,
                      event_sink=lambda e: None).groups
    extra_records, _ = H.lm_records([1], seed=9)
    extra = UserBatch(records=extra_records, user_ids=torch.full((1,), 99, dtype=torch.int64))
    plan = _scaled(policy.plan(0, groups), 1e-3)
    result = add_one_user_shift(H.lora_lm, plan, _batch([2, 1]), extra, H.lm_loss, num_users=20, seed=1,
                                engine_factory=buggy_engine_factory(PlantedBug.RAW_CLIP_COUNTS))
    assert any("clip count moved 1 > 1/2" in v for v in result.violations()), result
    assert result.count_shift == pytest.approx((1.0,) * len(groups))  # twice the accounted 1/2


def test_clip_counts_are_estimates_of_the_raw_count_with_centred_noise():
    """With sigma_b tiny the released count is the number of unclipped users up to (B - n)/2 (public B/2 back)."""
    model = H.lora_lm()
    batch = _batch([1, 1, 1, 1, 1, 1])  # n = 6 users, B = q N = 10
    plan = FixedPolicy(noise_multiplier=1.0, clip_norm=1e6).plan(0, DPEngine(
        model, stage="sft", sampling_rate=0.5, num_users=20, seed=0, policy=FixedPolicy(noise_multiplier=1.0,
        clip_norm=1.0), event_sink=lambda e: None).groups)
    plan = type(plan)(clip_norms=plan.clip_norms, noise_stds=plan.noise_stds, count_noise_std=1e-9)
    _, counts, _, _ = _release(model, _Replay(plan), batch, seed=1)
    # every user is unclipped: sum(b - 1/2) = 6 - 3 = 3, plus B/2 = 5 -> 8 (the raw count 6 plus (B - n)/2 = 2)
    assert counts == pytest.approx((8.0,) * len(counts), abs=1e-6)


def test_effective_multiplier_of_the_report_is_recomputable():
    model = H.lora_lm()
    policy = AdaptiveClippingPolicy(noise_multiplier=1.3, initial_clip_norm=0.3, count_noise_std=2.0)
    _, _, engine, result = _release(model, policy, _batch([1, 2]), seed=3)
    mech = engine.mechanism()
    k, sb, zg = mech["num_groups"], mech["count_noise_std"], mech["grad_noise_multiplier"]
    assert (zg**-2 + k * (2 * sb) ** -2) ** -0.5 == pytest.approx(result.event.noise_multiplier)
    assert mech["sigma_eff"] == pytest.approx(1.3)
    plan = result.released.plan
    assert zg == pytest.approx(effective_noise_multiplier(clip_norms=plan.clip_norms, noise_stds=plan.noise_stds))


# ---- 3. rows are attributed to records only when they are the records ----------------------------------------


def test_a_module_called_on_flattened_rows_is_an_error_not_a_misattribution():
    model = H.lora_lm()
    engine = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=0,
                      policy=FixedPolicy(noise_multiplier=1.0, clip_norm=1.0), event_sink=lambda e: None,
                      check_record_independence=False)
    records, users = H.lm_records([1, 1])
    lora_module = next(m for n, m in model.named_modules() if n.endswith("c_attn"))

    def flattening_loss(rec):
        out = H.lm_loss(model)(rec)
        x = torch.randn(rec["input_ids"].shape[0] * 2, lora_module.in_features)  # [2R, d]: two rows per record
        return out + 0 * lora_module(x).sum()

    with pytest.raises(ValueError, match="cannot be attributed"):
        engine.step(UserBatch(records=records, user_ids=users), flattening_loss)
    # the same call declared as two stacked copies of the records is accepted
    engine2 = DPEngine(H.lora_lm(), stage="sft", sampling_rate=0.5, num_users=8, seed=0,
                       policy=FixedPolicy(noise_multiplier=1.0, clip_norm=1.0), event_sink=lambda e: None,
                       check_record_independence=False)
    model2 = engine2.model
    mod2 = next(m for n, m in model2.named_modules() if n.endswith("c_attn"))

    def stacked_loss(rec):
        out = H.lm_loss(model2)(rec)
        with stacked_copies(2):
            extra = mod2(torch.randn(rec["input_ids"].shape[0] * 2, mod2.in_features)).sum()
        return out + 0 * extra

    engine2.step(UserBatch(records=records, user_ids=users), stacked_loss)

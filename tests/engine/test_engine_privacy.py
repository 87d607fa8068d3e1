"""Noise per group, fresh each release; Poisson inclusion frequency; events match the steps taken."""

from __future__ import annotations

import math

import pytest
import torch

from accounting.ledger import BudgetExceededError
from accounting.mechanisms import adaptive_clipping_multiplier, grad_noise_for_target
from tests.engine import engine_helpers as H
from trainers.engine import (
    AdaptiveClippingPolicy,
    DPEngine,
    FixedPolicy,
    PerLayerFixedPolicy,
    PoissonUserSampler,
    UserBatch,
)


def _capture(engine: DPEngine) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = []
    engine.apply_fn = lambda grads: out.append([g.clone() for g in grads])
    return out


def test_noise_std_per_group_is_right_and_fresh_every_step():
    """Empty samples: the release is pure noise; group k's coordinates must be N(0, (s_k / B)^2).

    Chi-square over all coordinates and steps of a group: sum(x^2)/sd^2 ~ chi2(n), |z| < 5. A sqrt(K)-trap
    allocation (s_k = sigma * C_k) or a wrong normalization moves z by hundreds.
    """
    model = H.lora_score_model()
    clips = (0.5, 2.0, 1.0)
    policy = PerLayerFixedPolicy(noise_multiplier=0.8, clip_norms=clips, noise_allocation="proportional")
    engine = DPEngine(model, stage="rm", sampling_rate=0.25, num_users=40, seed=5, policy=policy,
                      event_sink=lambda e: None, check_weights_move=False)
    draws = _capture(engine)
    steps = 30
    for _ in range(steps):
        engine.step(UserBatch.empty(), lambda rec: None)
    plan = policy.plan(0, engine.groups)
    assert plan.noise_stds == pytest.approx(tuple(0.8 * math.sqrt(3) * c for c in clips))
    b = engine.expected_batch_size
    for k, members in enumerate(engine.group_members):
        x = torch.cat([torch.cat([d[i].flatten() for i in members]) for d in draws]).double()  # [steps * numel_k]
        sd = plan.noise_stds[k] / b
        n = x.numel()
        z = (float((x / sd).pow(2).sum()) - n) / math.sqrt(2 * n)
        assert abs(z) < 5, (engine.groups[k].name, z)
        assert abs(float(x.mean())) < 5 * sd / math.sqrt(n)
    first = torch.cat([g.flatten() for g in draws[0]])
    second = torch.cat([g.flatten() for g in draws[1]])
    assert not torch.equal(first, second)
    corr = float(torch.corrcoef(torch.stack([first, second]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(first.numel())


def test_noise_is_deterministic_in_seed_and_step():
    grads = []
    for seed in (1, 1, 2):
        engine = DPEngine(H.lora_lm(), stage="sft", sampling_rate=0.5, num_users=4, seed=seed,
                          policy=FixedPolicy(noise_multiplier=1.0, clip_norm=1.0), event_sink=lambda e: None)
        out = _capture(engine)
        engine.step(UserBatch.empty(), lambda rec: None)
        grads.append(out[0][0])
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])


def test_poisson_inclusion_frequency_matches_q():
    n_users, q, steps = 300, 0.1, 200
    sampler = PoissonUserSampler(n_users, sampling_rate=q, seed=11)
    counts = torch.zeros(n_users)
    sizes = []
    for t in range(steps):
        idx = sampler.sample(t)
        assert bool((idx[1:] > idx[:-1]).all())  # sorted, no duplicates
        counts[idx] += 1
        sizes.append(idx.numel())
    total = counts.sum().item()
    mean, var = n_users * steps * q, n_users * steps * q * (1 - q)
    assert abs(total - mean) < 4 * math.sqrt(var)  # binomial(N*T, q)
    # each user ~ Binomial(T, q): chi-square of the per-user counts against it (dof = N), |z| < 5
    chi2 = float(((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum())
    assert abs((chi2 - n_users) / math.sqrt(2 * n_users)) < 5
    assert len(set(sizes)) > 3  # the batch size varies (Poisson, not fixed-size shuffling)
    assert torch.equal(sampler.sample(7), PoissonUserSampler(n_users, sampling_rate=q, seed=11).sample(7))
    assert sampler.expected_batch_size == pytest.approx(30.0)


def _run(policy, *, steps=3, repeats=1, grouping="module"):
    model = H.lora_lm()
    events = []
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = DPEngine(model, stage="sft", sampling_rate=0.3, num_users=10, seed=0, policy=policy,
                      event_sink=events.append, grouping=grouping, optimizer=opt)
    sampler = PoissonUserSampler(10, sampling_rate=0.3, seed=0)
    records, users = H.lm_records([2, 1, 1, 2, 1, 1, 1, 2, 1, 1])
    results = []
    for t in range(steps):
        keep = torch.isin(users, sampler.sample(t))
        batch = UserBatch(records={k: v[keep] for k, v in records.items()}, user_ids=users[keep])
        for r in range(repeats):
            results.append(engine.step(batch, H.lm_loss(model), repeats=repeats, release=r))
            opt.step()
            opt.zero_grad()
    return engine, events, results


def test_fixed_and_per_layer_events_match_steps():
    _, events, _ = _run(FixedPolicy(noise_multiplier=1.3, clip_norm=0.1))
    assert [e.step for e in events] == [0, 1, 2]
    assert all(e.sampling_rate == 0.3 and e.repeats == 1 and e.purpose == "gradient" and e.stage == "sft"
               for e in events)
    assert all(e.noise_multiplier == pytest.approx(1.3) for e in events)
    _, events, _ = _run(PerLayerFixedPolicy(noise_multiplier=0.9, clip_norms=[0.1, 0.3]))
    assert [e.noise_multiplier for e in events] == pytest.approx([0.9] * 3)


def test_per_group_noise_without_sqrt_k_correction_is_reported_as_lower_sigma():
    """The sqrt(K) trap: a policy giving s_k = sigma * C_k is accounted at sigma / sqrt(K), not sigma."""

    class TrapPolicy(FixedPolicy):
        def plan(self, step, groups):
            plan = super().plan(step, groups)
            return type(plan)(clip_norms=plan.clip_norms, noise_stds=tuple(self.noise_multiplier * c
                                                                             for c in plan.clip_norms))

    _, events, _ = _run(TrapPolicy(noise_multiplier=1.0, clip_norm=0.1), steps=1)
    assert events[0].noise_multiplier == pytest.approx(1.0 / math.sqrt(2))


def test_adaptive_clipping_folds_count_cost_and_moves_thresholds():
    policy = AdaptiveClippingPolicy(noise_multiplier=1.0, initial_clip_norm=10.0, count_noise_std=1.5,
                                    target_quantile=0.5, learning_rate=0.5)
    engine, events, results = _run(policy, steps=3)
    z_grad = grad_noise_for_target(target_multiplier=1.0, count_noise_std=1.5, num_counts=2)
    assert z_grad > 1.0  # the gradient pays for the counts
    plan = results[0].released.plan
    assert plan.noise_stds[0] == pytest.approx(z_grad * 10.0 * math.sqrt(2))
    assert adaptive_clipping_multiplier(grad_noise_multiplier=z_grad, count_noise_std=1.5, num_counts=2) == \
        pytest.approx(1.0)
    assert [e.noise_multiplier for e in events] == pytest.approx([1.0] * 3)
    assert results[0].released.noisy_unclipped_counts is not None
    # geometric update from the RELEASED (noisy) counts only: C <- C * exp(-lr * (count / B - gamma))
    for before, after in zip(results[:-1], results[1:], strict=True):
        rel = before.released
        for k, count in enumerate(rel.noisy_unclipped_counts):
            expected = rel.plan.clip_norms[k] * math.exp(-0.5 * (count / rel.expected_batch_size - 0.5))
            assert after.released.plan.clip_norms[k] == pytest.approx(expected)


def test_sample_reuse_is_one_event_with_repeats_and_fresh_noise():
    engine, events, results = _run(FixedPolicy(noise_multiplier=1.0, clip_norm=0.05), steps=2, repeats=3)
    assert [(e.step, e.repeats) for e in events] == [(0, 3), (1, 3)]
    assert [(r.step, r.release) for r in results] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert results[1].event is results[0].event
    g0, g1 = results[0].released.noisy_grads[0][0], results[1].released.noisy_grads[0][0]
    assert not torch.allclose(g0, g1)
    with pytest.raises(ValueError, match="release"):
        engine.step(UserBatch.empty(), lambda rec: None, repeats=3, release=1)  # no open step


def test_refused_step_is_not_taken():
    model = H.lora_lm()
    events = []
    engine = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=0,
                      policy=FixedPolicy(noise_multiplier=1.0, clip_norm=1.0), event_sink=events.append,
                      admit=lambda e: e.step < 1)
    engine.step(UserBatch.empty(), lambda rec: None)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # the caller's optimizer steps between releases
        for p in model.parameters():
            if p.requires_grad:
                p -= 0.1 * p.grad
    with pytest.raises(BudgetExceededError, match="step 1"):
        engine.step(UserBatch.empty(), lambda rec: None)
    assert len(events) == 1 and engine.next_step == 1
    assert all(torch.equal(p.grad, g) for p, g in zip([p for p in model.parameters() if p.requires_grad], grads, strict=True))
    assert not all(torch.equal(p, b) for p, b in zip([p for p in model.parameters() if p.requires_grad], before, strict=True))


def _pure_noise_releases(policy, *, steps: int, repeats: int = 1):
    """Releases on empty samples: every value is noise only. Returns (engine, [[per-tensor grads]], results)."""
    model = H.lora_lm()
    engine = DPEngine(model, stage="ppo", sampling_rate=0.25, num_users=40, seed=11, policy=policy,
                      event_sink=lambda e: None, check_weights_move=False)
    draws = _capture(engine)
    results = []
    for _ in range(steps):
        for r in range(repeats):
            results.append(engine.step(UserBatch.empty(), lambda rec: None, repeats=repeats, release=r))
    return engine, draws, results


def test_every_release_of_a_reused_sample_draws_independent_noise():
    """K releases of one sample (PPO epochs) are K Gaussian releases: each must carry fresh, independent noise
    of the full std. Reused noise (one draw per step) would make the releases identical; it cancels when two
    releases are subtracted, so "two releases differ" is not a test of it."""
    engine, draws, _ = _pure_noise_releases(FixedPolicy(noise_multiplier=1.0, clip_norm=0.5), steps=2, repeats=3)
    flat = [torch.cat([g.flatten() for g in d]).double() for d in draws]  # 6 releases
    n = flat[0].numel()
    sd = engine.policy.plan(0, engine.groups).noise_stds[0] / engine.expected_batch_size  # isotropic: one s
    for x in flat:
        z = (float((x / sd).pow(2).sum()) - n) / math.sqrt(2 * n)
        assert abs(z) < 5
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            corr = float(torch.corrcoef(torch.stack([flat[i], flat[j]]))[0, 1])
            assert abs(corr) < 5 / math.sqrt(n), (i, j, corr)


def test_clip_count_noise_is_gaussian_with_the_planned_std():
    """Empty samples: each released count is B/2 + N(0, sigma_b^2) (centred sum 0). Chi-square over all counts;
    no count noise, or a scaled one, moves z by far more than 5."""
    sigma_b = 1.5
    policy = AdaptiveClippingPolicy(noise_multiplier=1.0, initial_clip_norm=0.5, count_noise_std=sigma_b)
    engine, _, results = _pure_noise_releases(policy, steps=150)
    b = engine.expected_batch_size
    x = torch.tensor([c - b / 2 for r in results for c in r.released.noisy_unclipped_counts], dtype=torch.float64)
    n = x.numel()
    z = (float((x / sigma_b).pow(2).sum()) - n) / math.sqrt(2 * n)
    assert abs(z) < 5, z
    assert abs(float(x.mean())) < 5 * sigma_b / math.sqrt(n)


def test_event_is_durable_before_the_update_is_applied_and_a_failing_sink_applies_nothing():
    """Write-ahead at the engine: apply_fn runs only after the sink returned for that step; a sink that raises
    (the ledger could not write) leaves the weights and gradients untouched."""
    model = H.lora_lm()
    durable: list[int] = []
    applied: list[int] = []
    engine = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=0,
                      policy=FixedPolicy(noise_multiplier=1.0, clip_norm=1.0), event_sink=lambda e: durable.append(e.step),
                      check_weights_move=False)

    def apply(grads):
        assert durable and durable[-1] == engine.next_step - 1, "update applied before its event was durable"
        applied.append(durable[-1])

    engine.apply_fn = apply
    records, users = H.lm_records([1, 2])
    for _ in range(3):
        engine.step(UserBatch(records=records, user_ids=users), H.lm_loss(model))
    assert applied == durable == [0, 1, 2]

    def broken_sink(event):
        raise OSError("disk full")

    before = [p.detach().clone() for p in model.parameters()]
    engine2 = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=0,
                       policy=FixedPolicy(noise_multiplier=1.0, clip_norm=1.0), event_sink=broken_sink)
    engine2.apply_fn = lambda grads: pytest.fail("applied although the event was never recorded")
    with pytest.raises(OSError, match="disk full"):
        engine2.step(UserBatch(records=records, user_ids=users), H.lm_loss(model))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_what_a_policy_observes_is_the_noisy_release_itself():
    """The policy (adaptive clipping, the learned controller) may only see released quantities: its gradients are
    the released tensors and its norms their norms. On empty samples the pre-noise sums are 0, so norms computed
    before the noise (a private statistic) would read 0."""
    engine, draws, results = _pure_noise_releases(FixedPolicy(noise_multiplier=1.0, clip_norm=0.5), steps=2)
    for d, r in zip(draws, results, strict=True):
        rel = r.released
        for k, members in enumerate(engine.group_members):
            want = math.sqrt(sum(float(d[i].double().pow(2).sum()) for i in members))
            assert want > 0 and rel.noisy_grad_norms[k] == pytest.approx(want, rel=1e-6)
            assert all(torch.equal(g, d[i]) for g, i in zip(rel.noisy_grads[k], members, strict=True))

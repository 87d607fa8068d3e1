"""Contract violations are refused with clear errors: cross-example modules and losses, frozen adapters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.engine import engine_helpers as H
from trainers.engine import AdaptiveClippingPolicy, DPEngine, FixedPolicy, GroupSpec, ReleasedStep, UserBatch
from trainers.engine.engine import FrozenAdapterError, RecordIndependenceError
from trainers.engine.per_user import CrossExampleModuleError

POLICY = FixedPolicy(noise_multiplier=1.0, clip_norm=1.0)


def _engine(model, **kw):
    kw.setdefault("policy", POLICY)
    kw.setdefault("event_sink", lambda e: None)
    return DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=0, **kw)


def test_batchnorm_model_is_refused_naming_the_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(CrossExampleModuleError, match=r"module 1 \(BatchNorm1d\)"):
        _engine(model)


def test_unsupported_trainable_module_is_refused():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    with pytest.raises(TypeError, match="w belongs to a Scale"):
        _engine(nn.Sequential(nn.Linear(3, 3), Scale()))


def test_losses_that_mix_records_are_refused():
    model = H.lora_lm()
    records, users = H.lm_records([2, 2])
    batch = UserBatch(records=records, user_ids=users)
    per_record = H.lm_loss(model)
    events = []
    with pytest.raises(RecordIndependenceError, match="mixes records"):
        _engine(model, event_sink=events.append).step(batch, lambda rec: per_record(rec) - per_record(rec).mean().detach())
    assert events == []  # refused before anything was recorded or released
    with pytest.raises(ValueError, match=r"one loss per record, shape \[4\]"):
        _engine(model, check_record_independence=False).step(batch, lambda rec: per_record(rec).mean())
    _engine(model, event_sink=events.append).step(batch, per_record)  # the per-record loss itself passes
    assert [(e.stage, e.step) for e in events] == [("sft", 0)]


def test_private_engine_needs_a_ledger_sink_and_a_policy():
    model = H.lora_lm()
    with pytest.raises(ValueError, match="event_sink"):
        DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=0, policy=POLICY)
    with pytest.raises(ValueError, match="policy"):
        DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=0, policy=None, event_sink=print)
    # a non-main rank writes no events, so it needs no sink: it still releases (the same noise as rank 0)
    rank1 = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=0, policy=POLICY,
                     is_main_process=False)
    rank1.step(UserBatch.empty(), lambda rec: None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert rank1.next_step == 1 and trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize(("sigma", "clip", "match"), [(1.0, math.inf, "inf"), (0.0, 1.0, "not private")])
def test_private_engine_refuses_non_private_plans(sigma, clip, match):
    model = H.lora_lm()
    events = []
    engine = _engine(model, policy=FixedPolicy(noise_multiplier=sigma, clip_norm=clip), event_sink=events.append)
    with pytest.raises(ValueError, match=match):
        engine.step(UserBatch.empty(), lambda rec: None)
    assert events == [] and all(p.grad is None for p in model.parameters())


def test_optimizer_built_before_adapters_is_caught():
    base = H.tiny_gpt2()
    opt = torch.optim.SGD(base.parameters(), lr=0.1)  # built before add_lora: holds no adapter
    from trainers.models.lora import add_lora

    model = add_lora(base, r=4, alpha=8)
    with pytest.raises(AssertionError, match="not in the optimizer"):
        _engine(model, optimizer=opt)


def test_weights_that_do_not_move_after_the_first_step_are_caught():
    model = H.lora_lm()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # steps nothing
    engine = _engine(model, optimizer=opt)
    engine.step(UserBatch.empty(), lambda rec: None)
    opt.step()
    with pytest.raises(FrozenAdapterError, match="did not change"):
        engine.step(UserBatch.empty(), lambda rec: None)


def test_weights_that_move_pass_the_check():
    model = H.lora_lm()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = _engine(model, optimizer=opt)
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for _ in range(3):
        engine.step(UserBatch.empty(), lambda rec: None)  # raises FrozenAdapterError if the weights stood still
        opt.step()
    assert engine.next_step == 3
    now = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(start, now, strict=True))


def test_adaptive_policy_tracks_the_quantile_from_released_counts():
    policy = AdaptiveClippingPolicy(noise_multiplier=1.0, initial_clip_norm=1.0, count_noise_std=5.0,
                                    target_quantile=0.5, learning_rate=0.2)
    groups = (GroupSpec("a", 10, ("a.w",)), GroupSpec("b", 10, ("b.w",)))
    plan = policy.plan(0, groups)
    released = ReleasedStep(step=0, release=0, plan=plan, groups=groups, noisy_grads=((), ()),
                            noisy_grad_norms=(0.0, 0.0), noisy_unclipped_counts=(100.0, 0.0),
                            expected_batch_size=100.0)
    policy.observe(released)  # group a: all unclipped -> C shrinks; group b: all clipped -> C grows
    assert policy.clip_norms == pytest.approx([math.exp(-0.1), math.exp(0.1)])
    with pytest.raises(ValueError, match="too small"):
        AdaptiveClippingPolicy(noise_multiplier=1.0, initial_clip_norm=1.0, count_noise_std=0.5).plan(0, groups * 3)

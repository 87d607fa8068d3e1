"""Per-user gradients against an autograd reference; clipping bounds; sigma=0, C=inf equals non-private."""

from __future__ import annotations

import math

import pytest
import torch

from tests.engine import engine_helpers as H
from trainers.engine import DPEngine, FixedPolicy, PerLayerFixedPolicy, UserBatch


def _engine(model, **kw):
    kw.setdefault("policy", FixedPolicy(noise_multiplier=1.0, clip_norm=1.0))
    kw.setdefault("event_sink", lambda e: None)
    return DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=3, **kw)


@pytest.mark.parametrize("cap", [None, 3])
def test_lm_per_user_grads_equal_autograd(cap):
    """LoRA A/B of both layers; users with 1-3 records, interleaved; cap=3 splits users over micro-batches."""
    model = H.lora_lm()
    records, users = H.lm_records([3, 1, 2, 3])
    engine = _engine(model, max_records_per_microbatch=cap)
    batch = UserBatch(records=records, user_ids=users * 10)  # arbitrary user ids
    if cap is not None:
        assert len(engine.microbatches(batch)) == 3
    ids, per_user = engine.per_user_gradients(batch, H.lm_loss(model))
    assert ids.tolist() == [0, 10, 20, 30]
    ref = H.reference_per_user(model, H.lm_loss(model), records, users)
    assert len(per_user) == 4  # c_attn of 2 layers x (A, B)
    for u in range(4):
        for i, g in enumerate(per_user):
            torch.testing.assert_close(g[u], ref[u][i], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the caller's .grad is untouched


@pytest.mark.parametrize("concat", [False, True])
def test_score_model_per_user_grads_equal_autograd(concat):
    """LoRA and the trainable head, Bradley-Terry loss with two forward calls or one call of 2R rows."""
    model = H.lora_score_model()
    records = H.pair_records(5)
    users = torch.tensor([0, 1, 0, 2, 1])
    engine = _engine(model, max_records_per_microbatch=2)
    loss_fn = H.bt_loss(model, concat=concat)
    _, per_user = engine.per_user_gradients(UserBatch(records=records, user_ids=users), loss_fn)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "head.weight" in names and "head.bias" in names
    ref = H.reference_per_user(model, loss_fn, records, users)
    for u in range(3):
        for i, g in enumerate(per_user):
            torch.testing.assert_close(g[u], ref[u][i], rtol=1e-4, atol=1e-6, msg=names[i])
    groups = [g.name for g in engine.groups]
    assert groups[-1] == "head" and len(groups) == 3  # two LoRA modules (A+B each) and the head


def test_grouping_modes():
    model = H.lora_score_model()
    assert [g.name for g in _engine(model, grouping="flat").groups] == ["all"]
    per_tensor = _engine(model, grouping="per_tensor").groups
    assert len(per_tensor) == 6 and all(len(g.param_names) == 1 for g in per_tensor)
    module = _engine(model).groups
    assert module[0].name.endswith("transformer.h.0.attn.c_attn")
    assert len(module[0].param_names) == 2  # A and B together
    assert sum(g.numel for g in module) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_every_clipped_contribution_is_within_its_group_threshold():
    model = H.lora_score_model()
    records = H.pair_records(8)
    users = torch.arange(8)
    clips = [0.05, 0.02, 0.01]
    engine = _engine(model, policy=PerLayerFixedPolicy(noise_multiplier=1.0, clip_norms=clips))
    _, per_user = engine.per_user_gradients(UserBatch(records=records, user_ids=users), H.bt_loss(model, concat=False))
    _, counts, scales = engine.clip_and_sum(per_user, clips)
    clipped_any = False
    for k, members in enumerate(engine.group_members):
        raw = torch.sqrt(sum(per_user[i].flatten(1).pow(2).sum(1) for i in members))  # [U]
        clipped = torch.sqrt(sum((scales[k][:, None] * per_user[i].flatten(1)).pow(2).sum(1) for i in members))
        assert bool((clipped <= clips[k] * (1 + 1e-6)).all()), (k, clipped.max())
        # unclipped users are untouched, clipped ones land on the threshold
        torch.testing.assert_close(clipped, torch.minimum(raw, torch.full_like(raw, clips[k])), rtol=1e-5, atol=0)
        assert counts[k] == (raw <= clips[k]).sum()
        clipped_any |= bool((raw > clips[k]).any())
    assert clipped_any


def test_single_user_update_has_group_norm_at_most_c():
    """End to end through step(): one user, no noise (non-private clipping baseline): update * B is the clipped
    contribution, so each group's norm is <= C."""
    model = H.lora_lm()
    records, users = H.lm_records([3])
    engine = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=0, private=False,
                      policy=FixedPolicy(noise_multiplier=0.0, clip_norm=0.01))
    engine.step(UserBatch(records=records, user_ids=users), H.lm_loss(model))
    params = [p for p in model.parameters() if p.requires_grad]
    for members in engine.group_members:
        norm = math.sqrt(sum(float(params[i].grad.pow(2).sum()) for i in members)) * engine.expected_batch_size
        assert norm == pytest.approx(0.01, rel=1e-4)  # this user's raw norm is far above 0.01


def test_sigma0_cinf_equals_nonprivate_training():
    """Per-user path with sigma=0, C=inf == plain autograd through the engine == loss.sum()/B by hand."""
    records, users = H.lm_records([2, 1, 3, 1])
    batch = UserBatch(records=records, user_ids=users)
    updates = []
    for policy in (FixedPolicy(noise_multiplier=0.0, clip_norm=math.inf), None):
        model = H.lora_lm()
        engine = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=0, private=False, policy=policy,
                          max_records_per_microbatch=3)
        engine.step(batch, H.lm_loss(model))
        updates.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    model = H.lora_lm()
    (H.lm_loss(model)(records).sum() / 4.0).backward()  # B = q * N = 0.5 * 8
    manual = [p.grad for p in model.parameters() if p.requires_grad]
    for a, b, c in zip(*updates, manual, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-7)


def test_reduce_fn_sums_before_noise_and_noise_is_added_once():
    """A reduce_fn that doubles (two identical ranks) doubles the clipped sum but not the noise."""
    records, users = H.lm_records([2, 1, 2])
    batch = UserBatch(records=records, user_ids=users)
    out = {}
    for name, reduce_fn in (("plain", None), ("double", lambda ts: [t.mul_(2) for t in ts])):
        model = H.lora_lm()
        engine = _engine(model, policy=FixedPolicy(noise_multiplier=0.5, clip_norm=0.01), reduce_fn=reduce_fn)
        _, per_user = engine.per_user_gradients(batch, H.lm_loss(model))
        sums, _, _ = engine.clip_and_sum(per_user, (0.01, 0.01))
        got = []
        engine.apply_fn = got.extend  # capture instead of writing .grad
        engine.step(batch, H.lm_loss(model))
        out[name] = (got, [s / engine.expected_batch_size for s in sums])
    for g2, g1, clipped in zip(out["double"][0], out["plain"][0], out["plain"][1], strict=True):
        torch.testing.assert_close(g2 - g1, clipped, rtol=1e-4, atol=1e-6)


def test_microbatches_respect_record_and_token_caps():
    model = H.lora_lm()
    tokens = torch.tensor([5, 5, 5, 9, 2, 2, 2, 2])
    batch = UserBatch(records={"input_ids": torch.zeros(8, 10, dtype=torch.int64)}, user_ids=torch.arange(8),
                      record_tokens=tokens)
    engine = _engine(model, max_tokens_per_microbatch=10, max_records_per_microbatch=3)
    parts = engine.microbatches(batch)
    assert [p.tolist() for p in parts] == [[0, 1], [2], [3], [4, 5, 6], [7]]
    assert all(int(tokens[p].sum()) <= 10 and p.numel() <= 3 for p in parts)
    padded = UserBatch(records={"input_ids": torch.zeros(8, 10, dtype=torch.int64)}, user_ids=torch.arange(8))
    assert [p.numel() for p in _engine(model, max_tokens_per_microbatch=25).microbatches(padded)] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="over max_tokens_per_microbatch"):
        _engine(model, max_tokens_per_microbatch=8).microbatches(padded)

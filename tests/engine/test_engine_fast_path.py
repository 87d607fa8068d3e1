"""The fast path (ghost norms, book-keeping of the clipped sum) releases what the reference per-user path releases.

The reference is ``per_user_mode="materialize"``: every user's gradient materialised per tensor, which
``test_engine_grads`` checks against autograd user by user. Here users have several records (interleaved and split
over micro-batches), thresholds differ per module, and the same secret-free seed gives both paths the same noise,
so their releases must agree to float tolerance.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine import engine_helpers as H
from trainers.engine import DPEngine, PerLayerFixedPolicy, UserBatch
from trainers.engine.per_user import GhostGrad, as_tensor, ghost_pays, sq_norms


def _per_module_policy(model, batch: UserBatch, loss_fn) -> PerLayerFixedPolicy:
    """Thresholds per module at the median of its per-user norms (reference path): in every group some users
    are clipped and some are not, and the thresholds differ between modules."""
    probe = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=0, event_sink=lambda e: None,
                     policy=PerLayerFixedPolicy(noise_multiplier=1.0, clip_norms=[1.0] * 2),
                     per_user_mode="materialize")
    _, per_user = probe.per_user_gradients(batch, loss_fn)
    probe.close()
    clips = {}
    for group, members in zip(probe.groups, probe.group_members, strict=True):
        norms = torch.sqrt(sum(sq_norms(per_user[i]) for i in members))  # [U]
        clips[group.name] = float(norms.median())
    return PerLayerFixedPolicy(noise_multiplier=0.7, clip_norms=clips)


def _release(model, mode: str, batch: UserBatch, loss_fn, cap: int | None):
    out: list[list[torch.Tensor]] = []
    policy = _per_module_policy(model, batch, loss_fn)
    engine = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=5, policy=policy,
                      event_sink=lambda e: None, per_user_mode=mode, max_records_per_microbatch=cap,
                      check_weights_move=False, check_record_independence=False)
    engine.apply_fn = lambda grads: out.append([g.detach().clone() for g in grads])
    result = engine.step(batch, loss_fn)
    return out[0], result.released, engine


@pytest.mark.parametrize("mode", ["ghost", "auto"])
@pytest.mark.parametrize("cap", [None, 3])
def test_fast_release_equals_reference_release_for_users_with_several_records(mode, cap):
    model = H.lora_lm()
    records, users = H.lm_records([3, 1, 4, 2, 2])
    batch = UserBatch(records=records, user_ids=users)
    ref, ref_released, ref_engine = _release(model, "materialize", batch, H.lm_loss(model), cap)
    fast, fast_released, fast_engine = _release(model, mode, batch, H.lm_loss(model), cap)
    clips = ref_released.plan.clip_norms
    assert len(set(clips)) == len(clips) > 1  # per-module thresholds
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the clip counts are computed from the ghost norms: the same users were clipped in every group
    _, per_ref = ref_engine.per_user_gradients(batch, H.lm_loss(model))
    _, per_fast = fast_engine.per_user_gradients(batch, H.lm_loss(model))
    _, counts_ref, scales_ref = ref_engine.clip_and_sum(per_ref, clips)
    _, counts_fast, scales_fast = fast_engine.clip_and_sum(per_fast, clips)
    assert torch.equal(counts_ref, counts_fast)
    assert 0 < int(counts_ref.sum()) < counts_ref.numel() * 5  # in each group some users clipped, some not
    torch.testing.assert_close(scales_fast, scales_ref, rtol=1e-4, atol=1e-6)
    if mode == "ghost":
        assert all(isinstance(g, GhostGrad) for g in per_fast)  # LoRA A and B are Linear weights: all ghost
        for g, r in zip(per_fast, per_ref, strict=True):
            torch.testing.assert_close(sq_norms(g), sq_norms(r), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("concat", [False, True])
def test_ghost_per_user_grads_equal_autograd_with_a_head_and_stacked_calls(concat):
    """Ghost factors (materialised for the check) equal autograd per user: LoRA, a trainable head with a bias
    (the bias stays materialised), Bradley-Terry with two calls per record or one stacked call of 2R rows."""
    model = H.lora_score_model()
    records = H.pair_records(6)
    users = torch.tensor([0, 1, 0, 2, 1, 0])
    engine = DPEngine(model, stage="rm", sampling_rate=0.5, num_users=8, seed=3, event_sink=lambda e: None,
                      policy=PerLayerFixedPolicy(noise_multiplier=1.0, clip_norms=[0.1, 0.2, 0.3]),
                      per_user_mode="ghost", max_records_per_microbatch=4)
    loss_fn = H.bt_loss(model, concat=concat)
    _, per_user = engine.per_user_gradients(UserBatch(records=records, user_ids=users), loss_fn)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    kinds = {n: isinstance(g, GhostGrad) for n, g in zip(names, per_user, strict=True)}
    assert kinds["head.weight"] and not kinds["head.bias"]
    ref = H.reference_per_user(model, loss_fn, records, users)
    for i, g in enumerate(per_user):
        full = as_tensor(g)
        for u in range(3):
            torch.testing.assert_close(full[u], ref[u][i], rtol=1e-4, atol=1e-6, msg=names[i])
        norms = torch.stack([ref[u][i].pow(2).sum() for u in range(3)])
        torch.testing.assert_close(sq_norms(g), norms, rtol=1e-4, atol=1e-9, msg=names[i])


def test_auto_rule_is_fastdp_book_keeping_with_user_lengths():
    """Ghost where sum_u L_u^2 (in + out) < (sum_u L_u) in out: short users and a big full-rank weight; LoRA's
    r x in and out x r factors are materialised at any realistic length."""
    four_records_of_128 = torch.full((8,), 4 * 128)
    assert not ghost_pays(user_tokens=four_records_of_128, d_in=512, d_out=4)  # LoRA A
    assert not ghost_pays(user_tokens=four_records_of_128, d_in=4, d_out=2048)  # LoRA B of c_fc
    assert ghost_pays(user_tokens=torch.full((8,), 16), d_in=768, d_out=768)  # full-rank, short users
    assert not ghost_pays(user_tokens=torch.full((8,), 1024), d_in=768, d_out=768)  # long users
    # one long user is enough to tip it: the Gram grows with the square of a user's tokens
    assert not ghost_pays(user_tokens=torch.tensor([16] * 7 + [4096]), d_in=768, d_out=768)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="per_user_mode"):
        DPEngine(H.lora_lm(), stage="sft", sampling_rate=0.5, num_users=8, seed=0, event_sink=lambda e: None,
                 policy=PerLayerFixedPolicy(noise_multiplier=1.0, clip_norms=[1.0, 1.0]), per_user_mode="fast")

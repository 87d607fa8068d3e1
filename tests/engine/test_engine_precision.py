"""Mixed precision (trainers.precision): bf16 autocast of the forwards on CUDA, privacy arithmetic in fp32.

The CUDA tests run where a GPU is present and are skipped cleanly elsewhere; the CPU tests check that the same code
path is plain fp32 on CPU (autocast is a no-op there, so CPU releases are unchanged).
"""

from __future__ import annotations

import pytest
import torch

from tests.engine import engine_helpers as H
from trainers.engine import DPEngine, PerLayerFixedPolicy, UserBatch
from trainers.engine.per_user import as_tensor
from trainers.precision import autocast, autocast_dtype, full_precision

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast runs on CUDA only")


def _release(model, batch: UserBatch, *, mixed_precision: bool, mode: str = "auto") -> list[torch.Tensor]:
    out: list[list[torch.Tensor]] = []
    engine = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=2, event_sink=lambda e: None,
                      policy=PerLayerFixedPolicy(noise_multiplier=0.5, clip_norms=[0.05, 0.1]),
                      mixed_precision=mixed_precision, per_user_mode=mode,
                      check_weights_move=False, check_record_independence=False)
    engine.apply_fn = lambda grads: out.append([g.detach().float().cpu().clone() for g in grads])
    engine.step(batch, H.lm_loss(model))
    engine.close()
    return out[0]


def test_autocast_is_fp32_on_cpu_and_the_cpu_release_does_not_change():
    assert autocast_dtype("cpu") is None
    with autocast("cpu") as dtype:
        assert dtype is None
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), full_precision("cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32  # privacy arithmetic stays fp32
    model = H.lora_lm()
    records, users = H.lm_records([2, 3, 1])
    batch = UserBatch(records=records, user_ids=users)
    on, off = _release(model, batch, mixed_precision=True), _release(model, batch, mixed_precision=False)
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)


def test_privacy_arithmetic_is_fp32_inside_a_callers_bf16_autocast():
    """A caller (a stage) wrapping the step in CPU bf16 autocast: per-user gradients and norms still fp32."""
    model = H.lora_lm()
    records, users = H.lm_records([2, 1, 2])
    engine = DPEngine(model, stage="sft", sampling_rate=0.5, num_users=8, seed=2, event_sink=lambda e: None,
                      policy=PerLayerFixedPolicy(noise_multiplier=0.5, clip_norms=[0.05, 0.1]), per_user_mode="ghost")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, per_user = engine.per_user_gradients(UserBatch(records=records, user_ids=users), H.lm_loss(model))
        sums, _, scales = engine.clip_and_sum(per_user, [0.05, 0.1])
    assert all(as_tensor(g).dtype == torch.float32 for g in per_user)
    assert scales.dtype == torch.float32 and all(s.dtype == torch.float32 for s in sums)


@needs_cuda
@pytest.mark.parametrize("mode", ["materialize", "ghost"])
def test_bf16_release_on_cuda_is_close_to_fp32_and_refuses_nothing(mode):
    model = H.lora_lm().cuda()
    records, users = H.lm_records([2, 3, 1, 2])
    batch = UserBatch(records={k: v.cuda() for k, v in records.items()}, user_ids=users.cuda())
    assert autocast_dtype("cuda") == torch.bfloat16
    mixed = _release(model, batch, mixed_precision=True, mode=mode)
    full = _release(model, batch, mixed_precision=False, mode=mode)
    for a, b in zip(mixed, full, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()) + 1e-6)


@needs_cuda
def test_rollouts_generate_under_bf16_on_cuda():
    from trainers.models.tokenizer import train_tokenizer
    from trainers.rollout import generate_rollouts

    tok = train_tokenizer(["a good movie", "a bad film"] * 20, vocab_size=300, min_frequency=1)
    model = H.lora_lm().cuda()
    out = generate_rollouts(model, tok, ["a good", "a bad film"], max_new_tokens=4, temperature=1.0, top_k=0,
                            seed=0, batch_size=2)
    assert len(out) == 2 and all(1 <= len(r.response_ids) <= 4 for r in out)

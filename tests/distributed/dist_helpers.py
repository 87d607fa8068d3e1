"""Shared pieces of the distributed tests: a tiny LoRA GPT-2, users with several records, and a direct DP step.

The DP step here is the textbook computation (per-user autograd, per-module clipping, sum, reduce, noise from a
(seed, step) generator, divide by q*N), written independently of the engine so that the distributed mechanism
(sharding, all-reduce before noise, same noise on every rank, DeepSpeed apply) is tested against it.
Workers import this module and tests/tiny_models.py by value (ray.cloudpickle.register_pickle_by_value), so they
need no path setup.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tests import tiny_models as T
from trainers.distributed import ReduceFn, param_shape, trainable_named_parameters
from trainers.engine.sampling import step_seed

VOCAB = 100
SEQ = 8
NUM_USERS = 16
SAMPLING_RATE = 0.5
CLIP = 0.05


def tiny_lora_gpt2(seed: int = 0) -> torch.nn.Module:
    """GPT-2 with 2 layers, hidden 32, vocab 100, no dropout (per-user gradients must be deterministic), LoRA r=4
    on c_attn; B starts non-zero so A gets gradients."""
    return T.tiny_lora_gpt2(seed=seed, r=4, alpha=8, scale=0.1, vocab_size=VOCAB, n_positions=32)


def user_records(num_users: int = NUM_USERS, seed: int = 0) -> list[Tensor]:
    """user u -> token ids [n_records_u, SEQ] with 1 to 3 records per user."""
    gen = torch.Generator().manual_seed(seed + 7)
    counts = torch.randint(1, 4, (num_users,), generator=gen)
    return [torch.randint(0, VOCAB, (int(c), SEQ), generator=gen) for c in counts]


def dp_gradient(
    model: torch.nn.Module,
    records: list[Tensor],
    users: Tensor,
    *,
    clip: float,
    noise_multiplier: float,
    seed: int,
    step: int,
    expected_batch_size: float,
    reduce_fn: ReduceFn | None = None,
) -> list[Tensor]:
    """Final DP gradient for ``users`` (this rank's share), one tensor per trainable parameter, in module order.

    Groups: one per LoRA module (A and B together), each clipped to ``clip``; isotropic noise
    std = noise_multiplier * clip * sqrt(K) on every coordinate (sigma_eff = noise_multiplier).
    """
    from trainers.models.lora import lora_groups

    named = trainable_named_parameters(model)
    params = [p for _, p in named]
    index = {id(p): i for i, p in enumerate(params)}
    groups = [[index[id(p)] for p in ps] for ps in lora_groups(model).values()]
    sums = [torch.zeros(param_shape(p), dtype=p.dtype) for p in params]  # full shape also under ZeRO-3
    for u in users.tolist():
        ids = records[u]  # [n_records_u, SEQ]
        out = model(input_ids=ids, labels=ids)
        loss = out.loss * ids.shape[0]  # sum over the user's records (HF returns the mean over records)
        grads = torch.autograd.grad(loss, params)
        for g_idx in groups:
            norm = torch.sqrt(sum(grads[i].pow(2).sum() for i in g_idx))
            scale = torch.clamp(clip / (norm + 1e-12), max=1.0)
            for i in g_idx:
                sums[i] += grads[i] * scale
    if reduce_fn is not None:
        reduce_fn(sums)
    std = noise_multiplier * clip * math.sqrt(len(groups))
    gen = torch.Generator().manual_seed(step_seed(seed, step, "noise"))
    return [(s + std * torch.randn(s.shape, generator=gen)) / expected_batch_size for s in sums]


def user_batch(records: list[Tensor], users: Tensor) -> Any:
    """The engine's UserBatch holding every record of ``users`` (possibly none)."""
    from trainers.engine import UserBatch

    if len(users) == 0:
        return UserBatch(records={"input_ids": torch.zeros(0, SEQ, dtype=torch.int64)}, user_ids=users)
    ids = torch.cat([records[u] for u in users.tolist()])  # [R, SEQ]
    owners = torch.cat([torch.full((records[u].shape[0],), u) for u in users.tolist()])  # [R]
    return UserBatch(records={"input_ids": ids}, user_ids=owners)


def lm_loss_fn(model: torch.nn.Module) -> Any:
    """Per-record loss for the engine: mean next-token cross-entropy of each record ([R]); equals the HF loss
    that :func:`dp_gradient` sums per user (records have equal length)."""
    from trainers.rlhf.sft import causal_lm_loss_per_record

    def loss_fn(records: dict[str, Tensor]) -> Tensor:
        ids = records["input_ids"]  # [R, SEQ]
        return causal_lm_loss_per_record(model(input_ids=ids).logits, ids, torch.ones_like(ids))

    return loss_fn


def dp_engine(model: torch.nn.Module, *, seed: int, noise_multiplier: float, **hooks: Any) -> Any:
    """The real DPEngine with DP-SGD (per-module clip CLIP, isotropic noise); ``hooks``: reduce_fn, apply_fn,
    event_sink, is_main_process, optimizer."""
    from trainers.engine import DPEngine, FixedPolicy

    return DPEngine(
        model,
        stage="test",
        sampling_rate=SAMPLING_RATE,
        num_users=NUM_USERS,
        seed=seed,
        policy=FixedPolicy(noise_multiplier=noise_multiplier, clip_norm=CLIP),
        private=noise_multiplier > 0,
        **hooks,
    )

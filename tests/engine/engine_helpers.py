"""Tiny LoRA GPT-2 models, users with several records, per-record losses and an autograd reference."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests import tiny_models as T
from trainers.rlhf.sft import causal_lm_loss_per_record

VOCAB = 128
SEQ = 12


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """No dropout (per-user gradients must be deterministic), untied embeddings, token 0 as BOS and EOS."""
    return T.tiny_gpt2(vocab_size=VOCAB, n_positions=64, seed=seed, tie_word_embeddings=False, bos_token_id=0,
                       eos_token_id=0)


def lora_lm(seed: int = 0) -> nn.Module:
    """LoRA r=4 on :func:`tiny_gpt2`, A and B random (0.2 N(0, 1))."""
    from trainers.models.lora import add_lora

    return T.randomize_lora(add_lora(tiny_gpt2(seed), r=4, alpha=8), seed=seed + 1, scale=0.2)


def lora_score_model(seed: int = 0) -> nn.Module:
    from trainers.rlhf.heads import ScoreModel

    backbone = lora_lm(seed)
    torch.manual_seed(seed + 2)
    return ScoreModel(backbone)


def lm_records(user_counts: list[int], seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Records of users with the given record counts, interleaved (a user's records are not contiguous)."""
    gen = torch.Generator().manual_seed(seed + 7)
    users = torch.cat([torch.full((c,), u, dtype=torch.int64) for u, c in enumerate(user_counts)])
    users = users[torch.randperm(users.numel(), generator=gen)]  # [R]
    r = users.numel()
    ids = torch.randint(0, VOCAB, (r, SEQ), generator=gen)
    mask = torch.ones(r, SEQ, dtype=torch.int64)
    mask[:, :3] = 0  # a prompt of 3 tokens
    return {"input_ids": ids, "loss_mask": mask}, users


def lm_loss(model: nn.Module):
    def loss_fn(rec: dict[str, Tensor]) -> Tensor:
        logits = model(input_ids=rec["input_ids"]).logits  # [R, L, V]
        return causal_lm_loss_per_record(logits, rec["input_ids"], rec["loss_mask"])  # [R]

    return loss_fn


def pair_records(num_records: int, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed + 11)
    return {
        "chosen": torch.randint(0, VOCAB, (num_records, SEQ), generator=gen),
        "rejected": torch.randint(0, VOCAB, (num_records, SEQ), generator=gen),
    }


def bt_loss(model: nn.Module, *, concat: bool):
    """Bradley-Terry per record; ``concat`` scores chosen and rejected in one forward of 2R rows."""
    from trainers.engine.per_user import stacked_copies
    from trainers.rlhf.reward import bradley_terry_loss_per_record

    def loss_fn(rec: dict[str, Tensor]) -> Tensor:
        ones = torch.ones_like(rec["chosen"])
        if concat:
            with stacked_copies(2):  # rows j and R + j are record j's chosen and rejected sequences
                scores = model(torch.cat([rec["chosen"], rec["rejected"]]), torch.cat([ones, ones]))  # [2R]
            sc, sr = scores.chunk(2)
        else:
            sc, sr = model(rec["chosen"], ones), model(rec["rejected"], ones)  # [R], [R]
        return bradley_terry_loss_per_record(sc, sr)

    return loss_fn


def reference_per_user(model: nn.Module, loss_fn, records: dict[str, Tensor], users: Tensor) -> list[list[Tensor]]:
    """Per user (sorted ids), autograd gradients of the sum of that user's record losses, computed user by user."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for u in torch.unique(users).tolist():
        idx = torch.nonzero(users == u).flatten()
        loss = loss_fn({k: v[idx] for k, v in records.items()}).sum()
        out.append(list(torch.autograd.grad(loss, params)))
    return out

"""Shared pieces of the controller tests: a tiny LoRA LM, users' records, and a DP-SFT-like loop on the engine."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from accounting.ledger import Ledger
from tests import tiny_models as T
from trainers.rlhf.sft import causal_lm_loss_per_record

VOCAB = 64
SEQ = 10


def tiny_lora_lm(n_layer: int, seed: int = 0) -> nn.Module:
    """Hidden 16, no dropout, untied embeddings, LoRA r=2 with random A and B."""
    return T.tiny_lora_gpt2(seed=seed, r=2, alpha=4, scale=0.1, vocab_size=VOCAB, n_layer=n_layer, n_embd=16,
                            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


def records(num_users: int, seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """One record per user: a repeated pattern plus noise (learnable), loss on every token after the first."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.arange(SEQ) % 7 + 1
    ids = torch.where(
        torch.rand(num_users, SEQ, generator=gen) < 0.8,
        base,
        torch.randint(0, VOCAB, (num_users, SEQ), generator=gen),
    )
    mask = torch.ones(num_users, SEQ, dtype=torch.int64)
    return {"input_ids": ids, "loss_mask": mask}, torch.arange(num_users)


def run_sft(
    model: nn.Module,
    policy,
    *,
    run_dir: Path,
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    num_users: int,
    rdp_order: float,
    seed: int = 0,
    grouping: str = "module",
) -> Ledger:
    """A DP-SFT-like loop on the real engine and ledger; writes report.json so `privacy verify` can check it."""
    from accounting.composition import user_set_fingerprint
    from trainers.engine import DPEngine, PoissonUserSampler, UserBatch

    recs, users = records(num_users, seed)
    ledger = Ledger.open(
        run_dir / "ledger.jsonl",
        run_id="ctrl-test",
        target_epsilon=target_epsilon,
        target_delta=delta,
        accountant="rdp",
        composition="parallel",
        rdp_order=rdp_order,
    )
    ledger.begin_stage(
        "sft", user_fingerprint=user_set_fingerprint(map(str, users.tolist())), num_users=num_users
    )
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine = DPEngine(
        model,
        stage="sft",
        sampling_rate=q,
        num_users=num_users,
        seed=seed,
        policy=policy,
        event_sink=ledger.record,
        admit=ledger.admit,
        optimizer=opt,
        grouping=grouping,
    )
    sampler = PoissonUserSampler(num_users, sampling_rate=q, seed=seed)

    def loss_fn(rec):
        return causal_lm_loss_per_record(
            model(input_ids=rec["input_ids"]).logits, rec["input_ids"], rec["loss_mask"]
        )

    for t in range(steps):
        idx = sampler.sample(t)
        batch = (
            UserBatch(records={k: v[idx] for k, v in recs.items()}, user_ids=users[idx])
            if idx.numel()
            else UserBatch.empty()
        )
        opt.zero_grad()
        engine.step(batch, loss_fn)
        opt.step()
    ledger.end_stage("sft")
    (run_dir / "report.json").write_text(json.dumps({"privacy": ledger.report()}))
    return ledger


def public_validation(model: nn.Module, seed: int = 99):
    """Loss on held-out PUBLIC records (never the private ones)."""
    recs, _ = records(16, seed)

    @torch.no_grad()
    def loss() -> float:
        logits = model(input_ids=recs["input_ids"]).logits
        return float(causal_lm_loss_per_record(logits, recs["input_ids"], recs["loss_mask"]).mean())

    return loss


def group_specs(model: nn.Module, grouping: str) -> list:
    """The engine's public clipping groups of ``model`` (what ``DPEngine(grouping=...)`` will make)."""
    from trainers.engine.engine import clipping_groups, trainable_named_parameters
    from trainers.engine.policy import GroupSpec

    params = trainable_named_parameters(model)
    return [
        GroupSpec(name=n, numel=sum(params[i][1].numel() for i in idx), param_names=tuple(params[i][0] for i in idx))
        for n, idx in clipping_groups(model, params, grouping)
    ]


class RecordingPolicy:
    """Passes plan/observe through to a policy and keeps every plan and released group list (what the engine used)."""

    def __init__(self, inner) -> None:
        self.inner, self.plans, self.released_groups = inner, [], []

    def plan(self, step, groups):
        p = self.inner.plan(step, groups)
        self.plans.append(p)
        return p

    def observe(self, released) -> None:
        self.released_groups.append(tuple(g.name for g in released.groups))
        self.inner.observe(released)

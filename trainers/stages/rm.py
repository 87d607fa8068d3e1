"""Stage 2, the DP reward model on D2: the SFT model + a new LoRA + a scalar head, Bradley-Terry per pair.

The privacy unit is the user: all of a user's pairs are sampled together and their summed gradient (LoRA and
head) is clipped as one contribution. PPO consumes only this model's scores, so everything downstream of a DP
reward model is post-processing of D2 (docs/design.md section 2, "Why every stage is private").

Held-out pairwise accuracy is measured on PUBLIC pairs labeled by the gold oracle (two public reviews, the one
VADER scores higher is "chosen"); nothing about D2 is reported except through the ledger-accounted training.

Outputs (in ``out_dir``): ``adapter/`` (peft), ``backbone/`` (SFT + RM adapter merged; ``from_pretrained``),
``head.safetensors`` (the score head). ``load_reward_model(out_dir)`` opens it for scoring.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainers.stages.context import (
    StageContext,
    UserIndex,
    noise_disclosure,
    released_wall_time,
)
from trainers.stages.learner import (
    Learner,
    build_engine,
    learner_state,
    make_learner_optimizer,
    poisson_loop,
    restore_policy,
    resume_point,
    save_outputs,
    stage_noise_seed,
)
from trainers.stages.plan import stage_plan
from trainers.stages.ray_learner import check_distributable, run_stage_learner
from trainers.stages.summary import summarize


def tokenize_texts(tokenizer: Any, texts: list[str], *, max_len: int) -> tuple[Tensor, Tensor]:
    """Right-padded (input_ids [R, L], attention_mask [R, L]) keeping each text's first ``max_len`` tokens."""
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(1, max(len(e) for e in enc))
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        if not e:
            raise ValueError(f"text {i} tokenizes to nothing; every preference text must be non-empty")
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


def rm_texts(tokenizer: Any, prompts: list[str], completions: list[str]) -> list[str]:
    """``BOS + prompt + completion + EOS`` (or the chat template's turns + EOS, trainers.data.chat): the layout of a
    PPO rollout, which the reward model scores at its last token (training on another layout would make PPO's
    scores off-distribution)."""
    from trainers.data.chat import prompt_text, response_text

    return [f"{prompt_text(tokenizer, p)}{response_text(tokenizer, p, c)}{tokenizer.eos_token}"
            for p, c in zip(prompts, completions, strict=True)]


def gold_pairs(texts: list[str], *, count: int, seed: int, min_gap: float = 0.2) -> list[tuple[str, str]]:
    """Public (chosen, rejected) pairs from public texts, labeled by the gold oracle (VADER) with a clear gap."""
    from trainers.data.oracle import gold_reward

    rng = random.Random(seed)
    scores = gold_reward(texts)
    order = list(range(len(texts)))
    pairs: list[tuple[str, str]] = []
    for _ in range(20 * count):
        if len(pairs) >= count:
            break
        i, j = rng.sample(order, 2)
        if abs(scores[i] - scores[j]) < min_gap:
            continue
        pairs.append((texts[i], texts[j]) if scores[i] > scores[j] else (texts[j], texts[i]))
    if not pairs:
        raise ValueError("no public pair with a clear gold-reward gap: the public validation corpus is too small")
    return pairs


def pairwise_accuracy(model: torch.nn.Module, tokenizer: Any, pairs: list[tuple[str, str]], *, max_len: int) -> float:
    """Fraction of pairs whose chosen text the reward model scores higher (public pairs only)."""
    texts = rm_texts(tokenizer, [""] * (2 * len(pairs)), [c for c, _ in pairs] + [r for _, r in pairs])
    score = score_texts(model, tokenizer, texts, max_len=max_len)
    n = len(pairs)
    return float((score[:n] > score[n:]).float().mean())


def public_bt_loss(model: torch.nn.Module, tokenizer: Any, pairs: list[tuple[str, str]], *, max_len: int) -> float:
    """Mean Bradley-Terry loss on PUBLIC gold-labeled pairs (the learned controller's validation objective)."""
    texts = rm_texts(tokenizer, [""] * (2 * len(pairs)), [c for c, _ in pairs] + [r for _, r in pairs])
    score = score_texts(model, tokenizer, texts, max_len=max_len)
    n = len(pairs)
    return float(torch.nn.functional.softplus(score[n:] - score[:n]).mean())


def score_texts(model: torch.nn.Module, tokenizer: Any, texts: list[str], *, max_len: int, batch: int = 64) -> Tensor:
    """Scores [len(texts)] of a ScoreModel, in eval mode without gradients."""
    was = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                ids, mask = tokenize_texts(tokenizer, texts[i : i + batch], max_len=max_len)
                out.append(model(ids, mask))
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def bt_loss_fn(model: torch.nn.Module):
    """Per-record Bradley-Terry loss for the engine: -log sigmoid(s(chosen) - s(rejected)). Shape [R]."""
    from trainers.rlhf.reward import bradley_terry_loss_per_record

    def loss_fn(records: dict[str, Tensor]) -> Tensor:
        wc = int(records["c_mask"].sum(1).max().clamp(min=1))
        wr = int(records["r_mask"].sum(1).max().clamp(min=1))
        chosen = model(records["c_ids"][:, :wc], records["c_mask"][:, :wc])  # [R]
        rejected = model(records["r_ids"][:, :wr], records["r_mask"][:, :wr])  # [R]
        return bradley_terry_loss_per_record(chosen, rejected)  # [R]

    return loss_fn


def load_reward_model(rm_dir: str | Path) -> tuple[torch.nn.Module, Any]:
    """(ScoreModel in eval mode, tokenizer) from a reward-model stage directory."""
    from trainers.models.base import load_base_model
    from trainers.rlhf.heads import ScoreModel

    backbone, tokenizer = load_base_model(Path(rm_dir) / "backbone")
    model = ScoreModel(backbone)
    model.load_head(Path(rm_dir) / "head.safetensors")
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class RMPlan:
    """Everything a reward-model learner rank needs, fixed by the driver before any step (plain data).

    Attributes:
        sft_dir: the SFT model directory, the initialization (on a cluster, storage every worker can read).
        records: tokenized D2, each [R, L]: c_ids, c_mask (chosen), r_ids, r_mask (rejected).
        users: the privacy units (record -> user index).
        q, steps: the public schedule; sigma: the calibrated multiplier (None: non-private).
        pairs: PUBLIC gold-labeled (chosen, rejected) texts for the logged accuracy.
        eval_every: steps between public evaluations (checkpoints: ``run.checkpoint_every``).
    """

    sft_dir: str
    records: dict[str, Tensor]
    users: UserIndex
    q: float
    steps: int
    sigma: float | None
    pairs: list[tuple[str, str]]
    eval_every: int


def run_rm(
    ctx: StageContext,
    *,
    sft_dir: str | Path,
    data_path: str,
    out_dir: str | Path,
    public_texts: list[str],
    eval_every: int = 10,
) -> dict[str, Any]:
    """Train the reward model with the DP engine (or non-privately, same path) and export it.

    Driver side: data, users, schedule, sigma and the ledger's stage header; the training itself is
    :func:`learn_rm`, run here or on ``ray.num_workers`` Ray Train workers (``ctx.distributed``).

    Args:
        ctx: the stage context.
        sft_dir: the SFT model directory (merged; ``from_pretrained``), the reward model's initialization.
        data_path: D2 (columns user_id, prompt, chosen, rejected).
        out_dir: where ``adapter/``, ``backbone/`` and ``head.safetensors`` go.
        public_texts: PUBLIC held-out texts for gold-labeled pairs (accuracy; free to log).
        eval_every: steps between public accuracy evaluations.
    """
    from trainers.data.io import load_preferences
    from trainers.models.tokenizer import load_tokenizer

    t0 = time.time()
    cfg = ctx.cfg.rm
    data = load_preferences(data_path)
    rows = data.rows
    users = UserIndex.from_ids(list(rows["user_id"]))
    n = users.num_users
    q = cfg.sampling_rate(n)
    steps = cfg.num_steps(n)
    if ctx.distributed:
        check_distributable(ctx)

    tokenizer = load_tokenizer(sft_dir)
    prompts = list(rows["prompt"])
    c_ids, c_mask = tokenize_texts(tokenizer, rm_texts(tokenizer, prompts, rows["chosen"]), max_len=cfg.max_len)
    r_ids, r_mask = tokenize_texts(tokenizer, rm_texts(tokenizer, prompts, rows["rejected"]), max_len=cfg.max_len)
    records = {"c_ids": c_ids, "c_mask": c_mask, "r_ids": r_ids, "r_mask": r_mask}
    pairs = gold_pairs(public_texts, count=cfg.gold_pairs, seed=ctx.seed)

    stage = stage_plan(ctx, num_users=n, sampling_rate=q, steps=steps)  # frozen before any step
    sigma = stage.noise_multiplier
    if ctx.private:
        ctx.ledger.begin_stage(
            ctx.stage, user_fingerprint=users.fingerprint, num_users=n,
            target_epsilon=stage.target_epsilon, target_delta=stage.delta,
        )
    plan = RMPlan(
        sft_dir=str(sft_dir), records=records, users=users, q=q, steps=steps, sigma=sigma, pairs=pairs,
        eval_every=eval_every,
    )
    result = run_stage_learner(ctx, learn_rm, plan, fingerprint=users.fingerprint, out_dir=Path(out_dir))
    if ctx.private:
        ctx.ledger.end_stage(ctx.stage, status=result["status"], reason=result["reason"])
    return summarize(
        ctx, result, steps=result["steps"], planned_steps=steps, noise_multiplier=sigma,
        wall_time_s=released_wall_time(ctx, t0), sampling_rate=q, num_users=n,
        per_record_users=data.per_record_users, expected_batch_users=q * n, gold_pairs=len(pairs),
        learner_workers=ctx.cfg.ray.num_workers if ctx.distributed else 0,
        noise=noise_disclosure(ctx.cfg, private=ctx.private),
    )


def reward_model(cfg: Any, init_dir: str | Path) -> tuple[torch.nn.Module, Any]:
    """The initial model's backbone + a new LoRA (``cfg``: the rm config section) + a fresh score head, in this
    order of random draws (seeded by the caller): what the stage trains, and what the controller benchmark's
    reward-model runs start from."""
    from trainers.models.base import load_base_model
    from trainers.models.lora import add_lora
    from trainers.rlhf.heads import ScoreModel

    backbone, tokenizer = load_base_model(init_dir)
    backbone = add_lora(backbone, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                        target_modules=tuple(cfg.lora.target_modules))
    return ScoreModel(backbone), tokenizer


def learn_rm(ctx: StageContext, plan: RMPlan, learner: Learner) -> dict[str, Any]:
    """One learner rank of the DP reward model (every rank runs this; rank 0 logs and saves the outputs).

    Same sample on every rank, this rank's slice, clipped sums all-reduced before the one noise draw: the update
    equals the single-process one. Returns rank 0's results.
    """
    from trainers.engine.sampling import PoissonUserSampler

    cfg = ctx.cfg.rm
    steps, pairs = plan.steps, plan.pairs
    torch.manual_seed(ctx.seed)
    model, tokenizer = reward_model(ctx.cfg.rm, plan.sft_dir)
    model.to(learner.device)
    model.train()
    records = {k: v.to(learner.device) for k, v in plan.records.items()}
    users = plan.users

    ds_engine, optimizer, apply_fn, restored_step = make_learner_optimizer(
        learner, model, lambda ps: torch.optim.Adam(ps, lr=cfg.lr)
    )
    # A crashed attempt: restart after the last step on the ledger, never before (see resume_step).
    start, lost = resume_point(ctx, learner, restored_step=restored_step)
    noise = stage_noise_seed(ctx, learner)  # secret (collective: rank 0 draws, every rank receives)
    engine = build_engine(
        ctx, model, q=plan.q, users=users, noise_seed=noise, optimizer=optimizer, sigma=plan.sigma, steps=steps,
        start_step=start,
        validation_loss=lambda: public_bt_loss(model, tokenizer, pairs, max_len=cfg.max_len),
        learner=learner, apply_fn=apply_fn,
    )
    restore_policy(engine, learner.restored)
    sampler = PoissonUserSampler(users.num_users, sampling_rate=plan.q, seed=noise)
    loss_fn = bt_loss_fn(model)
    main = learner.is_main_process
    # Public evaluations run on rank 0 only, except under ZeRO-3 where every forward gathers weights collectively.
    evaluates = main or (learner.deepspeed is not None and learner.deepspeed.zero_stage == 3)

    acc = pairwise_accuracy(model, tokenizer, pairs, max_len=cfg.max_len) if evaluates else None
    acc0 = learner.restored["accuracy_start"] if learner.restored is not None else acc
    if acc is not None and start == 0:
        ctx.log("eval/rm_accuracy", acc, step=0)

    def evaluate(done: int) -> dict[str, str]:
        nonlocal acc
        if not evaluates:
            return {}
        acc = pairwise_accuracy(model, tokenizer, pairs, max_len=cfg.max_len)
        ctx.log("eval/rm_accuracy", acc, step=done)
        return {"acc": f"{acc:.3f}"}

    status, reason, done = poisson_loop(
        ctx, learner, engine, optimizer, users=users, records=records, loss_fn=loss_fn, sampler=sampler,
        steps=steps, start=start, eval_every=plan.eval_every, evaluate=evaluate, desc="reward model",
        state=lambda d: learner_state(model, optimizer, ds_engine, engine, next_step=d, accuracy_start=acc0,
                                     steps_lost_in_crash=lost),
    )
    save_outputs(learner, model, ds_engine, tokenizer, exporter=_export_rm,
                 init=lambda: reward_model(ctx.cfg.rm, plan.sft_dir)[0])
    return {"status": status, "reason": reason, "steps": done, "accuracy_start": acc0, "accuracy": acc,
            "resumed_at_step": start, "steps_lost_in_crash": lost, "mechanism": engine.mechanism()}


def _export_rm(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    from trainers.models.lora import merge_and_save

    model.backbone.save_pretrained(out / "adapter")
    merge_and_save(model.backbone, tokenizer, out / "backbone")
    model.save_head(out / "head.safetensors")

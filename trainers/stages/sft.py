"""Stage 1, DP-SFT on D1: the causal-LM loss on response tokens (prompt masked), a LoRA on the base model.

The loop reads top to bottom: sample users (Poisson, rate q) -> their records -> one engine step (per-user
gradient, per-module clipping, noise once, divide by the public B = q * N, ledger event written first) ->
optimizer step. Logged: epsilon spent, sigma_eff, the released noisy gradient norm, and the loss on PUBLIC
held-out text; never the private training loss.

Outputs (in ``out_dir``): ``adapter/`` (peft), ``model/`` (adapter merged: a plain Hugging Face model that the
reward model and PPO start from, loaded with ``from_pretrained``).
"""

from __future__ import annotations

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
    public_lm_loss,
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
from trainers.stages.summary import StageSummary, summarize


def sft_loss_fn(model: torch.nn.Module):
    """Per-record loss for the engine: mean next-token loss over each record's response tokens. Shape [R]."""
    from trainers.rlhf.sft import causal_lm_loss_per_record

    def loss_fn(records: dict[str, Tensor]) -> Tensor:
        width = int(records["attention_mask"].sum(1).max().clamp(min=1))  # right padding: trim the common tail
        ids = records["input_ids"][:, :width]  # [R, L']
        logits = model(input_ids=ids, attention_mask=records["attention_mask"][:, :width]).logits  # [R, L', V]
        return causal_lm_loss_per_record(logits, ids, records["loss_mask"][:, :width])  # [R]

    return loss_fn


@dataclass(frozen=True)
class SFTPlan:
    """Everything a learner rank needs, fixed by the driver before any step (plain, picklable data).

    Attributes:
        base_dir: the base model directory (``from_pretrained``; on a cluster, storage every worker can read).
        records: tokenized D1, each [R, L]: input_ids, attention_mask, loss_mask (prompt masked).
        users: the privacy units (record -> user index).
        q, steps: the public schedule; sigma: the calibrated multiplier (None: non-private).
        public_windows: [W, T] PUBLIC held-out token windows for the logged validation loss (or None).
        eval_every: steps between public evaluations (checkpoints: ``run.checkpoint_every``).
    """

    base_dir: str
    records: dict[str, Tensor]
    users: UserIndex
    q: float
    steps: int
    sigma: float | None
    public_windows: Tensor | None
    eval_every: int


def chat_mode(cfg: Any) -> str:
    """``data.chat_template`` of a run config ('auto' for configs without a data section)."""
    return str(getattr(getattr(cfg, "data", None), "chat_template", "auto"))


def sft_texts(tokenizer: Any, prompts: list[str], responses: list[str]) -> tuple[list[str], list[str]]:
    """(context, response) texts of the demonstrations (trainers.data.chat): ``BOS + prompt`` and the raw response,
    or the chat template's user turn and assistant turn. EOS is appended at tokenization."""
    from trainers.data.chat import prompt_text, response_text

    return ([prompt_text(tokenizer, p) for p in prompts],
            [response_text(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)])


def run_sft(
    ctx: StageContext,
    *,
    base_dir: str | Path,
    data_path: str,
    out_dir: str | Path,
    public_windows: Tensor | None = None,
    eval_every: int = 10,
) -> StageSummary:
    """Train the SFT adapter with the DP engine (or non-privately, same code path) and export the model.

    Driver side: data, users, schedule, sigma and the ledger's stage header; the training itself is
    :func:`learn_sft`, run here or on ``ray.num_workers`` Ray Train workers (``ctx.distributed``) with the same
    result.

    Args:
        ctx: the stage context (``ctx.private`` decides DP; the ledger gets this stage's events).
        base_dir: the base model directory (``from_pretrained``).
        data_path: D1 (columns user_id, prompt, response).
        out_dir: where ``adapter/`` and ``model/`` go.
        public_windows: [W, T] token windows of PUBLIC held-out text, for the logged validation loss.
        eval_every: steps between public validation evaluations.

    Returns:
        A plain-data summary for the report (steps, q, sigma, N, epsilon, status, losses on public data).
    """
    from trainers.data.chat import configure_chat
    from trainers.data.io import load_sft
    from trainers.models.tokenizer import load_tokenizer
    from trainers.rlhf.sft import tokenize_sft_pairs

    t0 = time.time()
    cfg = ctx.cfg.sft
    data = load_sft(data_path)
    rows = data.rows
    users = UserIndex.from_ids(list(rows["user_id"]))
    n = users.num_users
    q = cfg.sampling_rate(n)
    steps = cfg.num_steps(n)
    if ctx.distributed:
        check_distributable(ctx)

    # data.chat_template decides here for the whole run: the SFT export saves this tokenizer, later stages load it.
    tokenizer = configure_chat(load_tokenizer(base_dir), chat_mode(ctx.cfg))
    prompts, responses = sft_texts(tokenizer, list(rows["prompt"]), list(rows["response"]))
    batch = tokenize_sft_pairs(tokenizer, prompts, responses, max_length=cfg.max_len)
    records = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "loss_mask": batch.loss_mask}

    stage = stage_plan(ctx, num_users=n, sampling_rate=q, steps=steps)  # frozen before any step
    sigma = stage.noise_multiplier
    if ctx.private:
        ctx.ledger.begin_stage(
            ctx.stage, user_fingerprint=users.fingerprint, num_users=n,
            target_epsilon=stage.target_epsilon, target_delta=stage.delta,
        )
    plan = SFTPlan(
        base_dir=str(base_dir), records=records, users=users, q=q, steps=steps,
        sigma=sigma, public_windows=public_windows, eval_every=eval_every,
    )
    result = run_stage_learner(ctx, learn_sft, plan, fingerprint=users.fingerprint, out_dir=Path(out_dir))
    if ctx.private:
        ctx.ledger.end_stage(ctx.stage, status=result["status"], reason=result["reason"])
    return summarize(
        ctx, result, steps=result["steps"], planned_steps=steps, noise_multiplier=sigma,
        wall_time_s=released_wall_time(ctx, t0), sampling_rate=q, num_users=n,
        per_record_users=data.per_record_users, expected_batch_users=q * n,
        learner_workers=ctx.cfg.ray.num_workers if ctx.distributed else 0,
        noise=noise_disclosure(ctx.cfg, private=ctx.private),
    )


def learn_sft(ctx: StageContext, plan: SFTPlan, learner: Learner) -> dict[str, Any]:
    """One learner rank of DP-SFT (every rank runs this; rank 0 logs and saves ``adapter/`` and ``model/``).

    Every rank draws the same Poisson sample and keeps its slice; the engine all-reduces the clipped sums before
    the noise (``learner.hooks``), so the update is the single-process one. Returns rank 0's results.
    """
    from trainers.data.chat import configure_chat
    from trainers.engine.sampling import PoissonUserSampler
    from trainers.models.base import load_base_model
    from trainers.models.lora import add_lora

    cfg = ctx.cfg.sft
    steps, windows = plan.steps, plan.public_windows
    torch.manual_seed(ctx.seed)
    model, tokenizer = load_base_model(plan.base_dir)
    configure_chat(tokenizer, chat_mode(ctx.cfg))  # the exported tokenizer carries the run's decision
    model = add_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                     target_modules=tuple(cfg.lora.target_modules))
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
        validation_loss=(lambda: public_lm_loss(model, windows)) if windows is not None else None,
        learner=learner, apply_fn=apply_fn,
    )
    restore_policy(engine, learner.restored)
    sampler = PoissonUserSampler(users.num_users, sampling_rate=plan.q, seed=noise)
    loss_fn = sft_loss_fn(model)
    main = learner.is_main_process
    # Public evaluations run on rank 0 only, except under ZeRO-3 where every forward gathers weights collectively.
    evaluates = main or (learner.deepspeed is not None and learner.deepspeed.zero_stage == 3)

    valid_loss = public_lm_loss(model, windows) if windows is not None and evaluates else None
    first_valid = learner.restored["first_valid"] if learner.restored is not None else valid_loss
    if valid_loss is not None and start == 0:
        ctx.log("losses/public_valid", valid_loss, step=0)

    def evaluate(done: int) -> dict[str, str]:
        nonlocal valid_loss
        if windows is None or not evaluates:
            return {}
        valid_loss = public_lm_loss(model, windows)
        ctx.log("losses/public_valid", valid_loss, step=done)
        return {"valid": f"{valid_loss:.3f}"}

    status, reason, done = poisson_loop(
        ctx, learner, engine, optimizer, users=users, records=records, loss_fn=loss_fn, sampler=sampler,
        steps=steps, start=start, eval_every=plan.eval_every, evaluate=evaluate, desc="sft",
        state=lambda d: learner_state(model, optimizer, ds_engine, engine, next_step=d, first_valid=first_valid,
                                     steps_lost_in_crash=lost),
    )
    save_outputs(learner, model, ds_engine, tokenizer, exporter=_export_sft, init=lambda: _fresh_sft(ctx, plan))
    return {
        "status": status,
        "reason": reason,
        "steps": done,
        "public_valid_loss_start": first_valid,
        "public_valid_loss": valid_loss,
        "resumed_at_step": start,
        "steps_lost_in_crash": lost,
        "mechanism": engine.mechanism(),
    }


def _fresh_sft(ctx: StageContext, plan: SFTPlan) -> torch.nn.Module:
    """The SFT model as :func:`learn_sft` builds it (trainable values are overwritten by the trained ones)."""
    from trainers.models.base import load_base_model
    from trainers.models.lora import add_lora

    cfg = ctx.cfg.sft
    model, _ = load_base_model(plan.base_dir)
    return add_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                    target_modules=tuple(cfg.lora.target_modules))


def _export_sft(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    from trainers.models.lora import merge_and_save

    model.save_pretrained(out / "adapter")
    merge_and_save(model, tokenizer, out / "model")

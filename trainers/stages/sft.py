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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from accounting.ledger import BudgetExceededError
from trainers.stages.common import (
    StageContext,
    UserIndex,
    build_engine,
    calibrate_stage,
    progress_bar,
    public_lm_loss,
    spent_epsilon,
)


def sft_loss_fn(model: torch.nn.Module):
    """Per-record loss for the engine: mean next-token loss over each record's response tokens. Shape [R]."""
    from trainers.rlhf.sft import causal_lm_loss_per_record

    def loss_fn(records: dict[str, Tensor]) -> Tensor:
        width = int(records["attention_mask"].sum(1).max().clamp(min=1))  # right padding: trim the common tail
        ids = records["input_ids"][:, :width]  # [R, L']
        logits = model(input_ids=ids, attention_mask=records["attention_mask"][:, :width]).logits  # [R, L', V]
        return causal_lm_loss_per_record(logits, ids, records["loss_mask"][:, :width])  # [R]

    return loss_fn


def run_sft(
    ctx: StageContext,
    *,
    base_dir: str | Path,
    data_path: str,
    out_dir: str | Path,
    public_windows: Tensor | None = None,
    eval_every: int = 10,
) -> dict[str, Any]:
    """Train the SFT adapter with the DP engine (or non-privately, same code path) and export the model.

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
    from trainers.data.io import load_sft
    from trainers.engine.sampling import PoissonUserSampler
    from trainers.models.base import load_base_model
    from trainers.models.lora import add_lora, merge_and_save
    from trainers.rlhf.sft import tokenize_sft_pairs

    t0 = time.time()
    cfg = ctx.cfg.sft
    out = Path(out_dir)
    data = load_sft(data_path)
    rows = data.rows
    users = UserIndex.from_ids(list(rows["user_id"]))
    n = users.num_users
    q = cfg.sampling_rate(n)
    steps = cfg.num_steps(n)

    torch.manual_seed(ctx.seed)
    model, tokenizer = load_base_model(base_dir)
    model = add_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                     target_modules=tuple(cfg.lora.target_modules))
    model.train()
    # BOS + prompt: the context every document had in pretraining, and the one rollouts and evaluation use.
    bos = tokenizer.bos_token or tokenizer.eos_token
    prompts = [bos + p for p in rows["prompt"]]
    batch = tokenize_sft_pairs(tokenizer, prompts, list(rows["response"]), max_length=cfg.max_len)
    records = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "loss_mask": batch.loss_mask}

    sigma = None
    if ctx.private:
        sigma = calibrate_stage(ctx, q=q, steps=steps)
        ctx.ledger.begin_stage(
            ctx.stage, user_fingerprint=users.fingerprint, num_users=n,
            target_epsilon=ctx.target_epsilon, target_delta=ctx.target_delta,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    engine = build_engine(
        ctx, model, q=q, users=users, optimizer=optimizer, sigma=sigma, steps=steps,
        validation_loss=(lambda: public_lm_loss(model, public_windows)) if public_windows is not None else None,
    )
    sampler = PoissonUserSampler(n, sampling_rate=q, seed=ctx.seed)
    loss_fn = sft_loss_fn(model)

    from trainers.engine.engine import UserBatch

    status, reason, done = "completed", "", 0
    valid_loss = public_lm_loss(model, public_windows) if public_windows is not None else None
    first_valid = valid_loss
    if valid_loss is not None:
        ctx.log("losses/public_valid", valid_loss, step=0)
    bar = progress_bar(ctx, steps, f"sft ({'DP' if ctx.private else 'non-private'})")
    try:
        for step in range(steps):
            idx = users.records_of(sampler.sample(step))
            sample = UserBatch(records={k: v[idx] for k, v in records.items()}, user_ids=users.record_user[idx])
            try:
                result = engine.step(sample, loss_fn)
            except BudgetExceededError as err:
                status, reason = "refused", str(err)
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            post: dict[str, Any] = {}
            if result.released is not None:
                norm = float(sum(v * v for v in result.released.noisy_grad_norms) ** 0.5)
                ctx.log("privacy/noisy_grad_norm", norm, step=done, private=True, released=True)
                ctx.log("privacy/sigma_eff", result.event.noise_multiplier, step=done)
            if done % eval_every == 0 or done == steps:
                if ctx.private:
                    eps = spent_epsilon(ctx)
                    ctx.log("privacy/epsilon", eps, step=done)
                    post["eps"] = f"{eps:.2f}"
                if public_windows is not None:
                    valid_loss = public_lm_loss(model, public_windows)
                    ctx.log("losses/public_valid", valid_loss, step=done)
                    post["valid"] = f"{valid_loss:.3f}"
                bar.set_postfix(post)
            bar.update(1)
    finally:
        bar.close()
        engine.close()
    if ctx.private:
        ctx.ledger.end_stage(ctx.stage, status=status, reason=reason)

    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "adapter")
    merge_and_save(model, tokenizer, out / "model")
    return {
        "status": status,
        "reason": reason,
        "steps": done,
        "planned_steps": steps,
        "sampling_rate": q,
        "noise_multiplier": sigma,
        "num_users": n,
        "num_records": len(rows),
        "per_record_users": data.per_record_users,
        "expected_batch_users": q * n,
        "epsilon": spent_epsilon(ctx),
        "public_valid_loss_start": first_valid,
        "public_valid_loss": valid_loss,
        "wall_time_s": time.time() - t0,
    }

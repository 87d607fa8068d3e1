"""Held-out evaluation of a policy on PUBLIC prompts: gold reward, KL to the SFT model, public perplexity.

All inputs are public (evaluation prompts, the public validation corpus) and the models are DP outputs, so every
number here is post-processing and free to report. The gold reward is the oracle's score (VADER compound) of
``prompt + continuation``, as TRL's sentiment example scores query + response.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def sample_policy(model: Any, tokenizer: Any, prompts: Sequence[str], *, eval_cfg: Any, seed: int) -> list[Any]:
    """Rollouts of ``model`` on ``prompts`` with the evaluation's generation settings and ``seed``."""
    from trainers.rollout import generate_rollouts

    return generate_rollouts(
        model,
        tokenizer,
        list(prompts),
        max_new_tokens=eval_cfg.max_new_tokens,
        temperature=eval_cfg.temperature,
        top_k=eval_cfg.top_k,
        seed=seed,
        batch_size=eval_cfg.batch_size,
    )


def gold_rewards(prompts: Sequence[str], rollouts: Sequence[Any]) -> list[float]:
    """Oracle score of each prompt + continuation."""
    from trainers.data.oracle import gold_reward

    return gold_reward([p + r.text for p, r in zip(prompts, rollouts, strict=True)])


def sequence_logprobs(model: Any, rollouts: Sequence[Any], *, pad_id: int, batch_size: int = 32) -> Tensor:
    """Sum over each response of log p(token | prefix) under ``model``: [len(rollouts)].

    Sequences are left-padded prompt+response with position ids from the mask, the layout generation used, so
    the values are the log-probabilities the samples were drawn with (for the policy itself).
    """
    from trainers.rlhf.heads import position_ids_from_attention_mask
    from trainers.rlhf.ppo import logprobs_from_logits

    out = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(rollouts), batch_size):
                chunk = rollouts[i : i + batch_size]
                seqs = [r.prompt_ids + r.response_ids for r in chunk]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                resp = torch.zeros((len(seqs), width), dtype=torch.bool)
                for j, (s, r) in enumerate(zip(seqs, chunk, strict=True)):
                    ids[j, width - len(s) :] = torch.tensor(s)
                    mask[j, width - len(s) :] = 1
                    resp[j, width - len(r.response_ids) :] = True
                logits = model(
                    input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask)
                ).logits  # [b, W, V]
                lp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])  # [b, W-1]: log p(token t+1 | <= t)
                out.append((lp * resp[:, 1:].float()).sum(1))
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def kl_to_reference(policy: Any, reference: Any, rollouts: Sequence[Any], *, pad_id: int) -> float:
    """Monte-Carlo KL(policy || reference) per sequence: mean over policy samples of log p - log p_ref."""
    lp = sequence_logprobs(policy, rollouts, pad_id=pad_id)
    ref = sequence_logprobs(reference, rollouts, pad_id=pad_id)
    return float((lp - ref).mean())


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    eval_cfg: Any,
    reference: Any | None = None,
    public_windows: Tensor | None = None,
) -> dict[str, Any]:
    """Gold reward of samples over every (prompt, seed), KL to ``reference`` (if given), public perplexity."""
    from dpalign.stats import ci_entry
    from trainers.stages.context import public_lm_loss

    rewards: list[float] = []
    kls: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for seed in eval_cfg.seeds:
        rollouts = sample_policy(model, tokenizer, prompts, eval_cfg=eval_cfg, seed=seed)
        rewards.extend(gold_rewards(prompts, rollouts))
        if reference is not None:
            kls.append(kl_to_reference(model, reference, rollouts, pad_id=pad))
    ppl = math.exp(public_lm_loss(model, public_windows)) if public_windows is not None else None
    return {
        "gold_reward": ci_entry(rewards),
        "kl_to_sft": (sum(kls) / len(kls)) if kls else None,
        "perplexity": ppl,
    }

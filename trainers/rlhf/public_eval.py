"""Public evaluation of a PPO policy: generations from PUBLIC prompts scored for reward, KL to the reference and the
gold reward, the policy change over an iteration (clip fraction), and the reward model's scale measured on
public prompts. Everything here reads public data only, so it is free to log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trainers.rlhf.experience import response_slice
from trainers.rlhf.models import PPOModels
from trainers.rlhf.ppo import logprobs_from_logits, masked_fill_zero
from trainers.rlhf.rollout_batch import RolloutTensors, chunks, pad_rollouts, reference_logits, reward_scores


@dataclass(frozen=True)
class PublicEval:
    """Generations of the current policy on the fixed PUBLIC evaluation prompts, and what they cost nothing to log.

    Attributes:
        rollouts: the padded generations.
        logprobs: [R, T] the generating policy's log-probs of the generated tokens (0 on padding).
        reward: mean private-RM score (post-processing of the DP reward model on public prompts).
        kl: mean over prompts of the per-sequence KL to the reference: the exact KL of each next-token
            distribution, summed over the generated tokens (nats per sequence, the unit of ``kl_target``).
        gold_reward: mean gold (VADER) reward of the responses.
    """

    rollouts: RolloutTensors
    logprobs: Tensor
    reward: float
    kl: float
    gold_reward: float


def _response_logprobs(model_logits: Tensor, rollouts: RolloutTensors, sl: slice) -> Tensor:
    T = rollouts.action_mask.shape[1]
    resp = rollouts.sequences[sl, rollouts.prompt_len :]  # [r, T]
    lp = logprobs_from_logits(response_slice(model_logits, rollouts.prompt_len, T), resp)  # [r, T]
    return masked_fill_zero(lp, rollouts.action_mask[sl])


@torch.no_grad()
def policy_logprobs(models: PPOModels, rollouts: RolloutTensors, *, chunk_records: int) -> Tensor:
    """[R, T] current policy log-probs of the rollouts' tokens (0 on padding)."""
    out = []
    for sl in chunks(rollouts.num_records, chunk_records):
        logits, _ = models.actor(rollouts.sequences[sl], rollouts.attention_mask[sl])
        out.append(_response_logprobs(logits, rollouts, sl))
    return torch.cat(out)


@torch.no_grad()
def public_eval(
    models: PPOModels, prompts: Sequence[str], *, cfg: Any, seed: int, chunk_records: int
) -> PublicEval:
    """Generate from the current policy on PUBLIC prompts and measure reward, KL to the reference, gold reward.

    The same seed every iteration (common random numbers): differences between iterations come from the policy,
    not from the sampling noise.
    """
    from trainers.data.oracle import gold_reward
    from trainers.rollout import generate_rollouts

    tok = models.tokenizer
    gen = generate_rollouts(
        models.policy,
        tok,
        list(prompts),
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        seed=seed,
        batch_size=cfg.rollout_batch_size,
    )
    rollouts = pad_rollouts(gen, pad_id=int(tok.pad_token_id), eos_id=int(tok.eos_token_id)).to(models.device)
    logprobs, kls, scores = [], [], []
    T = rollouts.action_mask.shape[1]
    for sl in chunks(rollouts.num_records, chunk_records):
        seq, am = rollouts.sequences[sl], rollouts.attention_mask[sl]
        logits, _ = models.actor(seq, am)  # [r, S, V]
        ref_logits = reference_logits(models.reference, seq, am)  # [r, S, V]
        logp = torch.log_softmax(response_slice(logits, rollouts.prompt_len, T).float(), -1)  # [r, T, V]
        ref_logp = torch.log_softmax(response_slice(ref_logits, rollouts.prompt_len, T).float(), -1)
        # exact KL(pi || pi_ref) of each next-token distribution along the generated path: non-negative and far
        # less noisy than the sampled-token k1 estimate on a few prompts (it steers an adaptive beta)
        token_kl = (logp.exp() * (logp - ref_logp)).sum(-1)  # [r, T]
        kls.append(masked_fill_zero(token_kl, rollouts.action_mask[sl]).sum(1))  # [r] nats per sequence
        scores.append(reward_scores(models, seq, am))
        logprobs.append(_response_logprobs(logits, rollouts, sl))
    return PublicEval(
        rollouts=rollouts,
        logprobs=torch.cat(logprobs),
        reward=float(torch.cat(scores).mean()),
        kl=float(torch.cat(kls).mean()),
        gold_reward=float(sum(gold_reward(rollouts.texts)) / rollouts.num_records),
    )


@torch.no_grad()
def public_reward_norm(
    models: PPOModels, prompts: Sequence[str], *, cfg: Any, seed: int, seeds: int, chunk_records: int
) -> dict[str, float]:
    """Mean and standard deviation of the reward model's scores of the current (SFT) policy's samples on PUBLIC
    prompts, ``seeds`` samples per prompt: the constants of ``reward_normalization=public``.

    Public prompts and the DP reward model only (post-processing): nothing here depends on D3.

    Returns:
        {"shift": mean, "scale": std (floored at 1e-6), "samples": how many scores}.
    """
    from trainers.rollout import generate_rollouts

    tok = models.tokenizer
    scores = []
    for i in range(seeds):
        gen = generate_rollouts(
            models.policy, tok, list(prompts), max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_k=cfg.top_k, seed=seed + i, batch_size=cfg.rollout_batch_size,
        )
        rollouts = pad_rollouts(gen, pad_id=int(tok.pad_token_id), eos_id=int(tok.eos_token_id)).to(models.device)
        for sl in chunks(rollouts.num_records, chunk_records):
            scores.append(reward_scores(models, rollouts.sequences[sl], rollouts.attention_mask[sl]))
    flat = torch.cat(scores).double()
    return {"shift": float(flat.mean()), "scale": max(float(flat.std()), 1e-6), "samples": int(flat.numel())}


@torch.no_grad()
def normalize_score_head(head: nn.Linear, *, shift: float, scale: float) -> None:
    """Fold ``(score - shift) / scale`` into the reward model's linear head (every later score is normalized)."""
    head.bias.sub_(shift).div_(scale)
    head.weight.div_(scale)


def policy_change(models: PPOModels, before: PublicEval, *, clip_eps: float, chunk_records: int) -> tuple[float, float]:
    """(clip fraction, approx KL) of the policy update on PUBLIC rollouts generated before it.

    clipfrac: share of generated tokens whose ratio pi_new / pi_old is outside [1 - clip_eps, 1 + clip_eps], i.e.
    where PPO's clipped surrogate would be flat; approx KL: cleanrl's mean of (ratio - 1) - log ratio. Both are
    computed on public prompts, so they are free to log (the private batch's clip fraction is not released).
    """
    new = policy_logprobs(models, before.rollouts, chunk_records=chunk_records)  # [R, T]
    mask = before.rollouts.action_mask.bool()
    log_ratio = masked_fill_zero(new - before.logprobs, mask)  # [R, T]
    ratio = torch.exp(log_ratio)
    n = mask.sum().clamp(min=1)
    clipped = ((ratio - 1.0).abs() > clip_eps) & mask
    approx_kl = masked_fill_zero((ratio - 1.0) - log_ratio, mask).sum() / n
    return float(clipped.sum() / n), float(approx_kl)

"""The rollout record of DP-PPO and the pure function that builds it from model outputs.

Layout of a rollout (OpenRLHF's Experience, TRL's PPO batch): ``sequences = [prompt | response]`` with the
prompts LEFT-padded to a common width P (Hugging Face ``generate`` needs that for decoder-only models) and the
responses T tokens wide, right-padded after their EOS. Response token j sits at column P + j and was sampled
from the logits at column P + j - 1, so every per-action quantity is read from columns P - 1 ... P + T - 2 of a
full-sequence output (``response_slice``). The value of the state in which token j is chosen is read at the same
column.

Everything is per record: ``make_experience`` on a chunk of records gives exactly the rows it gives on the whole
batch (tested), so callers may build experience in chunks to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from trainers.rlhf.ppo import (
    KLEstimator,
    PPOStats,
    compute_token_rewards,
    entropy_from_logits,
    gae_advantages,
    kl_per_token,
    logprobs_from_logits,
    masked_fill_zero,
    normalize_advantages,
    ppo_loss_per_record,
    rloo_advantages,
)


@dataclass(frozen=True)
class Experience:
    """One batch of PPO rollouts, everything the K PPO epochs over this sample need.

    Attributes:
        sequences: [R, S] int64, S = P + T: left-padded prompt then response.
        attention_mask: [R, S] int64, 0 on prompt padding and on response padding after EOS.
        action_mask: [R, T] int64, 1 on real response tokens (up to and including the first EOS).
        prompt_len: P, the padded prompt width (response token j is at column P + j).
        user_index: [R] int64, the privacy unit of each record (the engine sums per-record gradients per user).

        old_logprobs: [R, T] log pi_old(a_t), the policy that generated the rollout (PPO ratio denominator).
        ref_logprobs: [R, T] log pi_ref(a_t), the frozen SFT reference.
        values: [R, T] V_old(s_t), the critic at rollout time (value clipping anchor, GAE baseline).

        scores: [R] private reward model's score of each full sequence.
        kl: [R, T] per-token KL estimate to the reference (0 on padding).
        rewards: [R, T] -beta * kl, plus the score on the last action.

        advantages: [R, T] GAE advantages after the (user-safe) normalization.
        returns: [R, T] value targets (GAE advantages before normalization + values).
    """

    # what was generated, and by whom
    sequences: Tensor
    attention_mask: Tensor
    action_mask: Tensor
    prompt_len: int
    user_index: Tensor
    # policy and critic at rollout time
    old_logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    # reward
    scores: Tensor
    kl: Tensor
    rewards: Tensor
    # PPO targets
    advantages: Tensor
    returns: Tensor

    @property
    def num_records(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def response_ids(self) -> Tensor:
        """[R, T] the generated tokens (the actions)."""
        return self.sequences[:, self.prompt_len :]

    def select(self, index: Tensor) -> Experience:
        """The records at ``index`` ([M] int64 or [R] bool), e.g. one PPO minibatch; user_index stays aligned."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v[index] if isinstance(v, Tensor) else v
        return Experience(**values)

    def to(self, device: torch.device | str) -> Experience:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in values.items()})


def response_slice(full: Tensor, prompt_len: int, response_len: int) -> Tensor:
    """Columns of a full-sequence output [R, S, ...] that produced (logits) or value (values) the response tokens.

    Returns:
        ``full[:, P - 1 : P - 1 + T]``, shape [R, T, ...].
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1 (a response token needs a prefix to be sampled from), got {prompt_len}")
    if full.shape[1] < prompt_len + response_len:
        raise ValueError(f"tensor has {full.shape[1]} positions, fewer than prompt {prompt_len} + response {response_len}")
    return full[:, prompt_len - 1 : prompt_len - 1 + response_len]


def action_mask_from_response(response_ids: Tensor, *, eos_token_id: int) -> Tensor:
    """1 on each response token up to and including its first EOS; all 1 when the row has no EOS.

    Works when pad == EOS (GPT-2): everything after the first EOS is padding whatever its id. A response that
    hit the length limit without EOS is entirely actions and its score lands on its last token, as in TRL.

    Args:
        response_ids: [R, T] int64 generated tokens (right-padded).

    Returns:
        [R, T] int64.
    """
    is_eos = (response_ids == eos_token_id).long()  # [R, T]
    eos_before = is_eos.cumsum(dim=1) - is_eos  # [R, T] EOS strictly before column t
    return (eos_before == 0).long()


def rollout_masks(
    sequences: Tensor, prompt_attention_mask: Tensor, *, eos_token_id: int
) -> tuple[Tensor, Tensor]:
    """Attention and action masks of generated sequences, needed before the scoring forward passes.

    Args:
        sequences: [R, P + T] prompt (left-padded, width P) and generated tokens.
        prompt_attention_mask: [R, P] the mask the prompts were generated with.

    Returns:
        (attention_mask [R, P + T], action_mask [R, T]), int64.
    """
    R, P = prompt_attention_mask.shape
    if sequences.shape[0] != R or sequences.shape[1] <= P:
        raise ValueError(
            f"sequences {tuple(sequences.shape)} must be [R, P + T] with T >= 1 for prompt mask {tuple(prompt_attention_mask.shape)}"
        )
    action_mask = action_mask_from_response(sequences[:, P:], eos_token_id=eos_token_id)  # [R, T]
    attention_mask = torch.cat([prompt_attention_mask.long(), action_mask], dim=1)  # [R, S]
    return attention_mask, action_mask


def make_experience(
    *,
    sequences: Tensor,
    attention_mask: Tensor,
    action_mask: Tensor,
    prompt_len: int,
    user_index: Tensor,
    policy_logits: Tensor,
    ref_logits: Tensor,
    values: Tensor,
    scores: Tensor,
    beta: float,
    gamma: float,
    lam: float,
    advantage_normalization: str,
    advantage_scale: float = 1.0,
    kl_estimator: KLEstimator = "k1",
) -> Experience:
    """Turn the rollout and the three scoring passes into PPO targets (no gradient; nothing crosses records).

    Args:
        sequences: [R, S] from generation; ``attention_mask``/``action_mask`` from ``rollout_masks``.
        prompt_len: P.
        user_index: [R] int64 user of each record.
        policy_logits: [R, S, V] the rollout policy's logits on ``sequences``.
        ref_logits: [R, S, V] the reference model's logits on ``sequences``.
        values: [R, S] the critic's values on ``sequences`` (``PolicyValueModel``).
        scores: [R] the private reward model's scores of ``sequences``.
        beta: KL coefficient (from a KL controller fed only released quantities).
        gamma, lam: GAE parameters.
        advantage_normalization: "none" | "per_trajectory" | "fixed" (batch-wide modes are refused).
        advantage_scale: the public constant of the "fixed" mode.
        kl_estimator: "k1" or "k3" (see ``trainers.rlhf.ppo``).
    """
    R, S = sequences.shape
    T = S - prompt_len
    if attention_mask.shape != (R, S) or action_mask.shape != (R, T):
        raise ValueError(
            f"attention_mask must be {(R, S)} and action_mask {(R, T)}; got {tuple(attention_mask.shape)}, "
            f"{tuple(action_mask.shape)}"
        )
    if policy_logits.shape[:2] != (R, S) or ref_logits.shape != policy_logits.shape:
        raise ValueError(
            f"policy_logits and ref_logits must be [R, S, V] with (R, S) = {(R, S)}; got "
            f"{tuple(policy_logits.shape)}, {tuple(ref_logits.shape)}"
        )
    if values.shape != (R, S) or scores.shape != (R,) or user_index.shape != (R,):
        raise ValueError(
            f"values must be {(R, S)}, scores and user_index {(R,)}; got {tuple(values.shape)}, "
            f"{tuple(scores.shape)}, {tuple(user_index.shape)}"
        )
    if user_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"user_index must be an integer tensor, got {user_index.dtype}")

    with torch.no_grad():
        response = sequences[:, prompt_len:]  # [R, T]
        old_logprobs = logprobs_from_logits(response_slice(policy_logits, prompt_len, T), response)  # [R, T]
        ref_logprobs = logprobs_from_logits(response_slice(ref_logits, prompt_len, T), response)  # [R, T]
        old_values = response_slice(values, prompt_len, T).float()  # [R, T]
        kl = masked_fill_zero(kl_per_token(old_logprobs, ref_logprobs, estimator=kl_estimator), action_mask)
        rewards = compute_token_rewards(
            scores.float(), old_logprobs, ref_logprobs, action_mask, beta=beta, kl_estimator=kl_estimator
        )  # [R, T]
        raw_advantages, returns = gae_advantages(rewards, old_values, action_mask, gamma=gamma, lam=lam)
        advantages = normalize_advantages(
            raw_advantages, action_mask, mode=advantage_normalization, scale=advantage_scale
        )
    return Experience(
        sequences=sequences,
        attention_mask=attention_mask.long(),
        action_mask=action_mask.long(),
        prompt_len=int(prompt_len),
        user_index=user_index.long(),
        old_logprobs=masked_fill_zero(old_logprobs, action_mask),
        ref_logprobs=masked_fill_zero(ref_logprobs, action_mask),
        values=masked_fill_zero(old_values, action_mask),
        scores=scores.detach().float(),
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )


def with_rloo_advantages(
    exp: Experience, group: Tensor, *, advantage_normalization: str, advantage_scale: float = 1.0
) -> Experience:
    """The experience with GAE's targets replaced by RLOO's: leave-one-out advantages over the samples of each
    prompt (``rloo_advantages``), normalized by a user-safe mode, and the rollout-time values as value targets.

    There is no critic under RLOO: the stage freezes the value head and gives the value loss weight 0, and
    ``returns = values`` makes the value loss 0 on its own as well. ``per_trajectory`` normalization is refused:
    the advantage is constant along a trajectory, so whitening within it would zero every advantage.

    Args:
        exp: experience of G >= 2 samples per prompt (``make_experience``, any advantages).
        group: [R] int64 group of each row (the record its prompt came from; one user per group).
        advantage_normalization: "none" or "fixed"; advantage_scale: the public constant of "fixed".
    """
    if advantage_normalization == "per_trajectory":
        raise ValueError(
            "advantage_normalization=per_trajectory with advantage_estimator=rloo: an RLOO advantage is one number "
            "per trajectory, which whitening within the trajectory turns into 0; use 'none' or 'fixed'"
        )
    raw = rloo_advantages(exp.rewards, exp.action_mask, group.to(exp.rewards.device), exp.user_index)
    advantages = normalize_advantages(raw, exp.action_mask, mode=advantage_normalization, scale=advantage_scale)
    return replace(exp, advantages=advantages, returns=exp.values)


def ppo_loss_on_experience(
    exp: Experience,
    logits: Tensor,
    values: Tensor,
    *,
    clip_eps: float,
    value_clip: float | None,
    vf_coef: float,
    with_entropy: bool = False,
) -> tuple[Tensor, PPOStats]:
    """The per-record PPO loss of a (mini)batch of experience, from the current actor-critic's outputs.

    This is the function a DP-PPO step hands to the engine as its per-record loss: call the actor on
    ``exp.sequences``/``exp.attention_mask`` (``PolicyValueModel``), then this, per PPO epoch and minibatch.

    Args:
        exp: the rollout (or ``exp.select(minibatch)``).
        logits: [R, S, V] current policy logits on ``exp.sequences``.
        values: [R, S] current values on ``exp.sequences``.

    Returns:
        (loss [R], per-record stats), as ``ppo_loss_per_record``.
    """
    T = exp.action_mask.shape[1]
    resp_logits = response_slice(logits, exp.prompt_len, T)  # [R, T, V]
    new_logprobs = logprobs_from_logits(resp_logits, exp.response_ids)  # [R, T]
    entropy = entropy_from_logits(resp_logits.detach()) if with_entropy else None
    return ppo_loss_per_record(
        new_logprobs,
        exp.old_logprobs,
        exp.advantages,
        response_slice(values, exp.prompt_len, T).float(),
        exp.values,
        exp.returns,
        exp.action_mask,
        clip_eps=clip_eps,
        value_clip=value_clip,
        vf_coef=vf_coef,
        entropy=entropy,
    )

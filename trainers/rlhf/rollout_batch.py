"""From generated rollouts to a PPO experience batch: padding to tensors, the reference's and the reward model's
scores (post-processing of DP or public models), the experience (KL-shaped rewards, GAE), and the per-record loss
the DP engine differentiates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from trainers.precision import autocast
from trainers.rlhf.experience import Experience, make_experience, rollout_masks, with_rloo_advantages
from trainers.rlhf.heads import (
    PolicyValueModel,
    last_token_index,
    position_ids_from_attention_mask,
)
from trainers.rlhf.models import PPOModels


@dataclass(frozen=True)
class RolloutTensors:
    """Rollouts re-padded for scoring: prompts LEFT-padded to width P, responses RIGHT-padded to width T.

    Attributes:
        sequences: [R, P + T] int64.
        attention_mask: [R, P + T] int64 (prompt padding and response padding after EOS are 0).
        action_mask: [R, T] int64, 1 on real response tokens (up to and including the first EOS).
        prompt_len: P.
        texts: the R decoded responses (for the gold oracle on PUBLIC prompts only).
    """

    sequences: Tensor
    attention_mask: Tensor
    action_mask: Tensor
    prompt_len: int
    texts: list[str]

    @property
    def num_records(self) -> int:
        return int(self.sequences.shape[0])

    def select(self, rows: Tensor) -> RolloutTensors:
        """The rollouts at ``rows`` ([M] int64), keeping the padded widths (a learner rank's shard)."""
        idx = rows.tolist()
        return RolloutTensors(
            self.sequences[rows], self.attention_mask[rows], self.action_mask[rows], self.prompt_len,
            [self.texts[i] for i in idx],
        )

    def to(self, device: str | torch.device) -> RolloutTensors:
        return RolloutTensors(
            self.sequences.to(device), self.attention_mask.to(device), self.action_mask.to(device), self.prompt_len,
            self.texts,
        )


def pad_rollouts(rollouts: Sequence[Any], *, pad_id: int, eos_id: int) -> RolloutTensors:
    """Left-pad the prompts and right-pad the responses of ``trainers.rollout.Rollout`` records.

    The padding width may differ from the one ``generate`` used (rollouts come from several generate calls);
    positions are recomputed from the mask (``position_ids_from_attention_mask``) in every forward, so the
    log-probs do not depend on it.
    """
    if not rollouts:
        raise ValueError("pad_rollouts needs at least one rollout")
    P = max(len(r.prompt_ids) for r in rollouts)
    T = max(len(r.response_ids) for r in rollouts)
    R = len(rollouts)
    sequences = torch.full((R, P + T), pad_id, dtype=torch.long)  # [R, S]
    prompt_mask = torch.zeros((R, P), dtype=torch.long)  # [R, P]
    for i, r in enumerate(rollouts):
        if not r.prompt_ids or not r.response_ids:
            raise ValueError(f"rollout {i} has an empty prompt or response; generation always yields both")
        p = len(r.prompt_ids)
        sequences[i, P - p : P] = torch.tensor(r.prompt_ids, dtype=torch.long)
        prompt_mask[i, P - p :] = 1
        sequences[i, P : P + len(r.response_ids)] = torch.tensor(r.response_ids, dtype=torch.long)
    attention_mask, action_mask = rollout_masks(sequences, prompt_mask, eos_token_id=eos_id)
    return RolloutTensors(sequences, attention_mask, action_mask, P, [r.text for r in rollouts])


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def reference_logits(reference: nn.Module, sequences: Tensor, attention_mask: Tensor) -> Tensor:
    """[R, S, V] reference logits with mask-derived positions (the same positions the policy sees)."""
    return reference(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_attention_mask(attention_mask),
    ).logits


def with_eos(sequences: Tensor, attention_mask: Tensor, *, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Terminate every row with EOS: one extra column, EOS right after the last real token where it is missing.

    Why: the reward model is trained on ``BOS + prompt + completion + EOS`` and reads its score at the last token
    (``trainers.stages.rm.rm_texts``), so its head only ever saw EOS hidden states. A rollout cut by
    ``max_new_tokens`` ends mid-sentence; scored there, the head reads a state it was never trained on (on the
    demo task the scores of SFT samples then correlate 0.03 with the gold reward, against 0.46 with EOS).
    Rows that already end with their generated EOS are left as they are (OpenRLHF appends EOS the same way).

    Args:
        sequences: [R, S] int64, prompt left-padded, response right-padded.
        attention_mask: [R, S] 0/1.

    Returns:
        ([R, S + 1] sequences, [R, S + 1] attention mask).
    """
    R = sequences.shape[0]
    seq = torch.cat([sequences, sequences.new_full((R, 1), pad_id)], dim=1)  # [R, S + 1]
    am = torch.cat([attention_mask, attention_mask.new_zeros((R, 1))], dim=1)  # [R, S + 1]
    last = last_token_index(attention_mask, validate=False)  # [R]
    rows = torch.arange(R, device=sequences.device)
    open_rows = sequences[rows, last] != eos_id  # [R] rows whose last real token is not EOS
    seq[rows[open_rows], last[open_rows] + 1] = eos_id
    am[rows[open_rows], last[open_rows] + 1] = 1
    return seq, am


@torch.no_grad()
def reward_scores(models: PPOModels, sequences: Tensor, attention_mask: Tensor) -> Tensor:
    """[R] private-RM scores of rollouts in the layout it was trained on (EOS-terminated, see :func:`with_eos`)."""
    tok = models.tokenizer
    seq, am = with_eos(sequences, attention_mask, eos_id=int(tok.eos_token_id), pad_id=int(tok.pad_token_id))
    return models.reward(seq, am)


def build_experience(
    models: PPOModels,
    rollouts: RolloutTensors,
    user_index: Tensor,
    *,
    beta: float,
    objective: Any,
    chunk_records: int,
    group: Tensor | None = None,
) -> Experience:
    """Score a sample of rollouts and build its PPO targets, ``chunk_records`` rows at a time (memory bound).

    ``make_experience`` is per record, so the chunked result equals the whole-batch one row for row. RLOO's
    baseline spans the samples of one prompt, which a chunk may split, so it is applied to the whole result.

    Args:
        user_index: [R] int64 user of each rollout (the engine's privacy unit).
        objective: ``PPOObjectiveConfig``.
        group: [R] int64 prompt (record) each rollout answers; needed by ``advantage_estimator=rloo``.
    """
    parts: list[Experience] = []
    device = models.device
    with torch.no_grad():
        for sl in chunks(rollouts.num_records, chunk_records):
            seq, am = rollouts.sequences[sl], rollouts.attention_mask[sl]
            # The three scoring forwards under bf16 autocast on CUDA (a no-op on CPU); log-probs, KL, rewards and
            # GAE below are computed from fp32 copies, like the learner's loss.
            with autocast(device):
                logits, values = models.actor(seq, am)  # [r, S, V], [r, S]
                ref_logits = reference_logits(models.reference, seq, am)
                scores = reward_scores(models, seq, am)  # [r]: post-processing of the DP reward model
            parts.append(
                make_experience(
                    sequences=seq,
                    attention_mask=am,
                    action_mask=rollouts.action_mask[sl],
                    prompt_len=rollouts.prompt_len,
                    user_index=user_index[sl],
                    policy_logits=logits.float(),
                    ref_logits=ref_logits.float(),
                    values=values.float(),
                    scores=scores.float(),
                    beta=beta,
                    gamma=objective.gamma,
                    lam=objective.lam,
                    advantage_normalization=objective.advantage_normalization,
                    advantage_scale=objective.advantage_scale,
                    kl_estimator=objective.kl_estimator,
                )
            )
    exp = concat_experience(parts)
    if not objective.critic:  # RLOO
        if group is None:
            raise ValueError("advantage_estimator=rloo needs the group (prompt) of every rollout")
        exp = with_rloo_advantages(exp, group, advantage_normalization=objective.advantage_normalization,
                                   advantage_scale=objective.advantage_scale)
    return exp


def concat_experience(parts: Sequence[Experience]) -> Experience:
    """One Experience from chunks that share the padded widths (rows in order)."""
    if not parts:
        raise ValueError("concat_experience needs at least one part")
    widths = {(p.prompt_len, p.sequences.shape[1]) for p in parts}
    if len(widths) != 1:
        raise ValueError(f"chunks were padded differently: {sorted(widths)}")
    values: dict[str, Any] = {}
    for f in fields(Experience):
        first = getattr(parts[0], f.name)
        values[f.name] = torch.cat([getattr(p, f.name) for p in parts]) if isinstance(first, Tensor) else first
    return Experience(**values)


def ppo_loss_fn(actor: PolicyValueModel, objective: Any) -> Any:
    """The per-record loss the engine differentiates: clipped policy loss + vf_coef * clipped value loss.

    One forward of the shared actor-critic per micro-batch, so one per-user gradient covers the LoRA and the value
    head. Without a critic (``advantage_estimator=rloo``) the value loss has weight 0: its gradient would reach
    the LoRA through the shared hidden states. Returns [R]; nothing is reduced across records.
    """
    from trainers.rlhf.experience import ppo_loss_on_experience

    vf_coef = objective.vf_coef if objective.critic else 0.0

    def loss_fn(exp: Experience) -> Tensor:
        logits, values = actor(exp.sequences, exp.attention_mask)  # [r, S, V], [r, S]
        loss, _ = ppo_loss_on_experience(
            exp,
            logits,
            values,
            clip_eps=objective.clip_eps,
            value_clip=objective.value_clip_or_none,
            vf_coef=vf_coef,
        )
        return loss  # [r]

    return loss_fn

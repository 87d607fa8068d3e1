"""PPO for language models (TRL / OpenRLHF / cleanrl conventions), with every loss and statistic per record.

A rollout is a prompt followed by T generated tokens; each generated token is an action. Shapes below:
R records (trajectories), T response positions, V vocabulary; ``mask`` [R, T] is 1 on real actions (the
response up to and including its EOS) and 0 on padding.

Reward (Ziegler et al. 2019; TRL): per token r_t = -beta * KL_t, plus the reward model's score on the LAST real
token. KL_t is estimated from the sampled token only: k1 = log pi(a_t) - log pi_ref(a_t) (unbiased for
KL(pi || pi_ref) when a_t ~ pi, but can be negative per token), or k3 = (ratio - 1) - log ratio with
ratio = pi_ref / pi (unbiased and non-negative, lower variance; Schulman's "approximating KL"). TRL's default,
and ours, is k1.

Advantages: GAE per trajectory (gamma, lambda; TRL default 1.0 and 0.95), bootstrapping 0 after the last real
token, so nothing leaks from one trajectory into another or from padding into a trajectory. Or, with several
samples per prompt, RLOO: each sample's return minus the mean return of the prompt's other samples, on every
action (``rloo_advantages``); the samples of one prompt belong to one user, so no quantity crosses users.

Why there is no batch-wide whitening: the engine clips each user's gradient to bound how much one user can move
the sum. If advantages (or rewards) are whitened with the batch mean and std, every record's loss depends on all
other users' rollouts, so adding or removing one user changes every other user's clipped contribution and the
sensitivity is no longer C (docs/design.md section 2). Only normalizations that read one trajectory
("per_trajectory") or a public constant ("fixed") are allowed; see ``check_advantage_normalization``.

Statistics (approx KL, clip fractions, value loss, entropy) are returned per record, detached. They are private
data when the rollouts come from private prompts: a stage may log their aggregate only after releasing it with
noise through the engine (a PrivacyEvent with purpose "metric"), never raw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

KLEstimator = Literal["k1", "k3"]
NormalizationMode = Literal["none", "per_trajectory", "fixed"]
NORMALIZATION_MODES: tuple[str, ...] = ("none", "per_trajectory", "fixed")
# Names under which batch-wide normalization appears in other libraries; each is refused with the reason.
BATCH_WIDE_MODES: tuple[str, ...] = ("batch", "global", "whiten", "batch_whiten", "running", "running_mean_std")


class BatchWhiteningError(ValueError):
    """A normalization across trajectories (users) was requested; it breaks per-user sensitivity."""


# --------------------------------------------------------------------------------------------- log-probs, KL


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log pi(label_t) at each position, from logits already aligned with the labels.

    Args:
        logits: [R, T, V]; ``logits[:, t]`` is the distribution the label at t was drawn from (for a causal
            LM over a full sequence, slice the logits one position left of the tokens: see
            ``trainers.rlhf.experience.response_slice``).
        labels: [R, T] int64 token ids.

    Returns:
        [R, T] float32 log-probabilities (computed in float32 so bf16 logits do not distort the PPO ratio).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [R, T, V] and labels [R, T]; got {tuple(logits.shape)}, {tuple(labels.shape)}")
    logp = F.log_softmax(logits.float(), dim=-1)  # [R, T, V]
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [R, T]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the policy's next-token distribution at each position: [R, T, V] -> [R, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [R, T, V]
    return -(logp.exp() * logp).sum(dim=-1)  # [R, T]


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens.

    Args:
        logprobs: [R, T] log pi(a_t) under the policy that sampled a_t.
        ref_logprobs: [R, T] log pi_ref(a_t) under the frozen reference (the SFT model).
        estimator: "k1" = logp - logp_ref (TRL default); "k3" = (exp(logp_ref - logp) - 1) - (logp_ref - logp).

    Returns:
        [R, T]; padding positions are not masked here (multiply by the mask).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    log_ratio = logprobs - ref_logprobs  # [R, T]
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def masked_fill_zero(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask is 1, else 0. ``torch.where`` rather than ``x * mask``: padding may hold inf or nan (log-probs
    of pad tokens, values past the end), and nan * 0 = nan would leak into sums over the record."""
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def last_action_index(mask: Tensor) -> Tensor:
    """Column of the last real action in each row of ``mask`` [R, T] -> [R]; refuses an empty row."""
    m = mask.long()
    empty = m.sum(dim=1) == 0
    if empty.any():
        raise ValueError(
            f"mask row {int(empty.nonzero()[0])} has no action token; a rollout always generates at least one"
            " token (EOS counts), so this is a masking bug upstream"
        )
    return (m.shape[1] - 1 - m.flip(dims=[1]).argmax(dim=1)).long()  # [R]


def compute_token_rewards(
    score: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    beta: float,
    kl_estimator: KLEstimator = "k1",
) -> Tensor:
    """Per-token PPO rewards: -beta * KL_t on every action, plus the sequence score on the last action.

    The score must come from the DIFFERENTIALLY PRIVATE reward model (post-processing); a non-private reward
    model trained on private preferences would make every PPO gradient depend on all of D2.

    Args:
        score: [R] reward-model score of each full sequence.
        logprobs: [R, T] old policy log-probs of the sampled tokens.
        ref_logprobs: [R, T] reference log-probs of the same tokens.
        mask: [R, T] 1 on real actions.
        beta: KL coefficient >= 0 (from a KL controller).

    Returns:
        [R, T] rewards, 0 on padding.
    """
    if not (beta >= 0.0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if score.dim() != 1 or logprobs.dim() != 2 or score.shape[0] != logprobs.shape[0] or mask.shape != logprobs.shape:
        raise ValueError(
            f"expected score [R], logprobs/ref_logprobs/mask [R, T]; got {tuple(score.shape)}, "
            f"{tuple(logprobs.shape)}, {tuple(mask.shape)}"
        )
    rewards = masked_fill_zero(-beta * kl_per_token(logprobs, ref_logprobs, estimator=kl_estimator), mask)  # [R, T]
    last = last_action_index(mask)  # [R]
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards


# ---------------------------------------------------------------------------------------------------- GAE


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation along each trajectory, independently.

    delta_t = r_t + gamma * V(next real step) - V_t, with V = 0 after the last real action (the episode ends at
    EOS or at the length limit; TRL treats both as terminal); A_t = delta_t + gamma * lam * A_(next real step).
    Positions with mask 0 are not steps: they get A = 0 and are skipped by the recursion, so neither padding nor
    values after the end can reach a real step, and no quantity crosses rows.

    Args:
        rewards: [R, T] per-token rewards (``compute_token_rewards``).
        values: [R, T] old value estimates V(s_t).
        mask: [R, T] 1 on real actions.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        (advantages [R, T], returns [R, T]) with returns = advantages + values on real steps (the value target,
        computed before any advantage normalization), both 0 on padding; detached.
    """
    if not (0.0 <= gamma <= 1.0) or not (0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1]; got gamma={gamma}, lam={lam}")
    if rewards.shape != values.shape or mask.shape != rewards.shape or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must all be [R, T]; got {tuple(rewards.shape)}, {tuple(values.shape)}, "
            f"{tuple(mask.shape)}"
        )
    rewards, values = rewards.detach().float(), values.detach().float()
    m = mask.bool()
    R, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # [R, T]
    next_value = torch.zeros(R, dtype=rewards.dtype, device=rewards.device)  # [R] V of the next real step
    next_adv = torch.zeros_like(next_value)  # [R] A of the next real step
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [R]
        adv_t = delta + gamma * lam * next_adv  # [R]
        valid = m[:, t]
        advantages[:, t] = torch.where(valid, adv_t, torch.zeros_like(adv_t))
        next_adv = torch.where(valid, adv_t, next_adv)
        next_value = torch.where(valid, values[:, t], next_value)
    returns = masked_fill_zero(advantages + values, m)  # [R, T]
    return advantages, returns


# ------------------------------------------------------------------------------------------ RLOO advantages

AdvantageEstimator = Literal["gae", "rloo"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("gae", "rloo")


def rloo_advantages(rewards: Tensor, mask: Tensor, group: Tensor, user_index: Tensor) -> Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, TRL's RLOOTrainer).

    Each prompt is sampled G >= 2 times; the rows of one prompt form a group. A row's sequence return is the sum
    of its token rewards (the score minus beta times its KL), and its advantage is that return minus the mean
    return of the OTHER rows of its group, placed on every one of its actions (no critic, no bootstrapping).

    Why this suits DP-PPO: the baseline removes what the prompt alone decides about the reward, the part an
    untrained value head leaves in GAE's advantages, so a user's gradient points along "this response rather than
    that one" instead of along the noise of the score function. Why it is user-safe: a group is the samples of ONE
    record, so the baseline reads only the same user's rollouts (checked here: a group that spans users is
    refused), and adding or removing another user changes nothing in this user's loss.

    Args:
        rewards: [R, T] per-token rewards (``compute_token_rewards``), 0 on padding.
        mask: [R, T] 1 on real actions.
        group: [R] int64 group id of each row (the record index its prompt came from).
        user_index: [R] int64 user of each row.

    Returns:
        [R, T] advantages, the row's leave-one-out advantage on each real action, 0 on padding; detached.

    Raises:
        ValueError: a group with fewer than two rows (no leave-one-out baseline), or one spanning two users.
    """
    if rewards.dim() != 2 or mask.shape != rewards.shape or group.shape != rewards.shape[:1]:
        raise ValueError(
            f"expected rewards and mask [R, T] and group [R]; got {tuple(rewards.shape)}, {tuple(mask.shape)}, "
            f"{tuple(group.shape)}"
        )
    if user_index.shape != group.shape:
        raise ValueError(f"user_index {tuple(user_index.shape)} must be [R] like group {tuple(group.shape)}")
    returns = masked_fill_zero(rewards.detach().float(), mask).sum(dim=1)  # [R] sequence returns
    ids, slot = torch.unique(group, return_inverse=True)  # slot: [R] in 0..G_count-1
    count = torch.zeros(len(ids), dtype=returns.dtype, device=returns.device).index_add_(
        0, slot, torch.ones_like(returns))  # [groups]
    if bool((count < 2).any()):
        lonely = int(ids[(count < 2).nonzero()[0]])
        raise ValueError(
            f"group {lonely} has one sample: the leave-one-out baseline needs ppo.samples_per_prompt >= 2"
        )
    users_lo = torch.full((len(ids),), torch.iinfo(torch.int64).max, dtype=torch.int64, device=group.device)
    users_hi = torch.full_like(users_lo, torch.iinfo(torch.int64).min)
    users_lo.scatter_reduce_(0, slot, user_index.long(), reduce="amin")
    users_hi.scatter_reduce_(0, slot, user_index.long(), reduce="amax")
    if bool((users_lo != users_hi).any()):
        bad = int(ids[(users_lo != users_hi).nonzero()[0]])
        raise ValueError(
            f"group {bad} holds rows of two users: a leave-one-out baseline across users would make one user's "
            "advantages depend on another's rollouts (per-user sensitivity); group the samples of one record"
        )
    total = torch.zeros_like(count).index_add_(0, slot, returns)  # [groups]
    baseline = (total[slot] - returns) / (count[slot] - 1.0)  # [R] mean of the other rows of the group
    return masked_fill_zero((returns - baseline).unsqueeze(1).expand_as(rewards), mask)


# ------------------------------------------------------------------------------------ advantage normalization


def check_advantage_normalization(mode: str, *, field: str = "advantage_normalization") -> NormalizationMode:
    """Validate a normalization mode, refusing any that couples trajectories (users).

    Raises:
        BatchWhiteningError: ``mode`` names a batch-wide (or running) normalization.
        ValueError: ``mode`` is unknown.
    """
    name = str(mode).strip().lower()
    if name in BATCH_WIDE_MODES:
        raise BatchWhiteningError(
            f"{field}={mode!r} is refused: normalizing advantages or rewards with statistics of the whole batch "
            "(or a running mean/std over earlier batches) makes every record's PPO loss depend on other users' "
            "rollouts, so one user changes all clipped per-user gradients and the DP sensitivity bound no "
            "longer holds (docs/design.md section 2). Use 'per_trajectory' (whiten within one trajectory), 'fixed' "
            "(divide by a public constant, advantage_scale) or 'none'."
        )
    if name not in NORMALIZATION_MODES:
        raise ValueError(f"{field}={mode!r} is unknown; allowed: {', '.join(NORMALIZATION_MODES)}")
    return name  # type: ignore[return-value]


def whiten_per_trajectory(values: Tensor, mask: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Whiten each row over its own real positions only: (x - mean_i) / sqrt(var_i + eps).

    A row with one real step has variance 0 and becomes 0 (nothing is known about its relative scale).

    Args:
        values: [R, T].
        mask: [R, T] 1 on real positions.

    Returns:
        [R, T], 0 on padding.
    """
    n = mask.to(values.dtype).sum(dim=1, keepdim=True).clamp(min=1.0)  # [R, 1]
    x = masked_fill_zero(values, mask)  # [R, T]
    mean = x.sum(dim=1, keepdim=True) / n  # [R, 1]
    var = masked_fill_zero((x - mean) ** 2, mask).sum(dim=1, keepdim=True) / n  # [R, 1] population variance
    return masked_fill_zero((x - mean) * torch.rsqrt(var + eps), mask)


def normalize_advantages(
    advantages: Tensor, mask: Tensor, *, mode: str, scale: float = 1.0, eps: float = 1e-8
) -> Tensor:
    """Normalize advantages without coupling trajectories.

    Modes:
        "none": unchanged.
        "per_trajectory": whitened within each trajectory's real tokens. Note that centring within a trajectory
            removes its mean advantage, the "this whole response was good" part of the signal; it suits a
            trained critic (whose advantages are already roughly centred) better than the first iterations.
        "fixed": divided by ``scale``, a PUBLIC constant fixed before the run (e.g. the reward model's score
            scale on public data) — the user-safe stand-in for TRL's batch whitening.
    Any batch-wide mode raises BatchWhiteningError.

    Args:
        advantages: [R, T].
        mask: [R, T].

    Returns:
        [R, T], 0 on padding.
    """
    name = check_advantage_normalization(mode)
    if name == "none":
        return masked_fill_zero(advantages, mask)
    if name == "per_trajectory":
        return whiten_per_trajectory(advantages, mask, eps=eps)
    if not (scale > 0.0 and math.isfinite(scale)):
        raise ValueError(f"advantage scale must be a finite public constant > 0, got {scale}")
    return masked_fill_zero(advantages / scale, mask)


# ------------------------------------------------------------------------------------------------- PPO loss


@dataclass(frozen=True)
class PPOStats:
    """Per-record diagnostics of one PPO loss evaluation, all [R] and detached.

    PRIVATE when computed on private rollouts: log only a noisy release of their sum (divided by the public
    expected batch size), never these tensors or their raw mean.

    Attributes:
        policy_loss: [R] clipped surrogate, mean over the record's actions.
        value_loss: [R] clipped value loss (with the 0.5 factor), mean over actions.
        approx_kl: [R] mean over actions of (ratio - 1) - log ratio (k3 of KL(old || new); cleanrl).
        clipfrac: [R] fraction of actions where the clipped surrogate was the active (larger) term.
        value_clipfrac: [R] fraction of actions where the clipped value loss was active.
        entropy: [R] mean policy entropy over actions, or None when no entropy was passed.
    """

    policy_loss: Tensor
    value_loss: Tensor
    approx_kl: Tensor
    clipfrac: Tensor
    value_clipfrac: Tensor
    entropy: Tensor | None = None


def masked_mean_per_record(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [R, T] over each row's real positions -> [R]; 0 for a row with none."""
    total = masked_fill_zero(x, mask).sum(dim=1)  # [R]
    return total / mask.bool().sum(dim=1).clamp(min=1).to(x.dtype)


def ppo_loss_per_record(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    value_clip: float | None = 0.2,
    vf_coef: float = 0.1,
    entropy: Tensor | None = None,
) -> tuple[Tensor, PPOStats]:
    """Clipped PPO policy loss + vf_coef * clipped value loss, one scalar per record (trajectory).

    Per token, with ratio = exp(new - old):
        pg_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - clip_eps, 1 + clip_eps))
        vf_t = 0.5 * max((V_t - G_t)^2, (V_old + clip(V_t - V_old, -value_clip, value_clip) - G_t)^2)
    and loss_i = mean_t pg_t + vf_coef * mean_t vf_t over record i's actions (TRL's formula; the per-RECORD
    mean replaces TRL's batch-wide masked mean, whose denominator is the realized token count of the whole
    batch and so couples records). Where the clipped term is the max, the gradient wrt the new log-prob is 0.

    Args:
        new_logprobs: [R, T] current policy log-probs of the rollout's tokens (requires grad).
        old_logprobs: [R, T] log-probs at rollout time.
        advantages: [R, T] (normalized by a user-safe mode).
        values: [R, T] current value predictions (requires grad).
        old_values: [R, T] values at rollout time.
        returns: [R, T] value targets from ``gae_advantages``.
        mask: [R, T] 1 on real actions.
        clip_eps: policy ratio clip.
        value_clip: value clip range around old_values; None disables value clipping.
        vf_coef: weight of the value loss.
        entropy: optional [R, T] per-token entropy, only for the stats (no entropy bonus in the loss, as TRL).

    Returns:
        (loss [R], stats): loss still attached to the graph; stats per record and detached.
    """
    shape = new_logprobs.shape
    tensors = {
        "old_logprobs": old_logprobs, "advantages": advantages, "values": values,
        "old_values": old_values, "returns": returns, "mask": mask,
    }
    if new_logprobs.dim() != 2:
        raise ValueError(f"new_logprobs must be [R, T], got {tuple(shape)}")
    for name, t in tensors.items():
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like new_logprobs")
    if not clip_eps > 0.0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if value_clip is not None and not value_clip > 0.0:
        raise ValueError(f"value_clip must be > 0 or None, got {value_clip}")

    advantages, old_logprobs = advantages.detach(), old_logprobs.detach()
    old_values, returns = old_values.detach(), returns.detach()

    # Zero the log-ratio on padding BEFORE exp: a large padding log-ratio would overflow to inf, and inf * 0
    # (or the backward of a masked-out inf) is nan, which would poison the whole record's loss and gradient.
    log_ratio = masked_fill_zero(new_logprobs - old_logprobs, mask)  # [R, T]
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg = torch.max(pg_unclipped, pg_clipped)  # [R, T]

    vf_unclipped = (values - returns) ** 2
    if value_clip is None:
        vf = 0.5 * vf_unclipped
        vf_clip_active = torch.zeros_like(vf_unclipped, dtype=torch.bool)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        vf_clipped = (v_clipped - returns) ** 2
        vf = 0.5 * torch.max(vf_unclipped, vf_clipped)  # [R, T]
        vf_clip_active = vf_clipped > vf_unclipped

    policy_loss = masked_mean_per_record(pg, mask)  # [R]
    value_loss = masked_mean_per_record(vf, mask)  # [R]
    loss = policy_loss + vf_coef * value_loss  # [R]

    with torch.no_grad():
        stats = PPOStats(
            policy_loss=policy_loss.detach(),
            value_loss=value_loss.detach(),
            approx_kl=masked_mean_per_record((ratio - 1.0) - log_ratio, mask).detach(),
            clipfrac=masked_mean_per_record((pg_clipped > pg_unclipped).float(), mask),
            value_clipfrac=masked_mean_per_record(vf_clip_active.float(), mask),
            entropy=None if entropy is None else masked_mean_per_record(entropy.detach().float(), mask),
        )
    return loss, stats


# ---------------------------------------------------------------------------------------------- KL control


class FixedKLController:
    """beta constant for the whole run."""

    def __init__(self, kl_coef: float) -> None:
        if not (kl_coef >= 0.0 and math.isfinite(kl_coef)):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, released_kl: float, n_steps: int) -> float:
        """No-op (same signature as the adaptive controller); returns beta."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019) adaptive beta: proportional control of the KL toward a target.

        e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)

    PRIVACY: the KL fed to ``update`` must be a RELEASED quantity, i.e. the noisy aggregate the engine released
    (and wrote to the ledger as a "metric" event), or a KL measured on public / held-out prompts. Feeding the
    raw batch KL of private rollouts would make beta, and so every later update, depend on an unaccounted
    private statistic. A non-finite value (a failed release) raises instead of silently steering.
    """

    def __init__(self, init_kl_coef: float, *, target: float, horizon: float) -> None:
        if not (init_kl_coef > 0.0 and math.isfinite(init_kl_coef)):
            raise ValueError(f"init_kl_coef must be a finite number > 0, got {init_kl_coef}")
        if not target > 0.0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0.0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, released_kl: float, n_steps: int) -> float:
        """Adapt beta from a released KL estimate measured over ``n_steps`` samples (TRL: the batch size).

        Returns:
            the new beta.
        """
        if not math.isfinite(released_kl):
            raise ValueError(f"released_kl must be finite, got {released_kl}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(released_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])

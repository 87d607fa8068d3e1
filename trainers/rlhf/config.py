"""Config of the PPO objective (the math; batch sizes, epochs and privacy belong to the stage's own config).

Defaults follow TRL (gamma 1, lambda 0.95, clip 0.2, value clip 0.2, vf_coef 0.1, k1 KL). A batch-wide
advantage normalization is refused here, at load time, before any privacy is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dpalign.config import ConfigError, require
from trainers.rlhf.ppo import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    check_advantage_normalization,
)


@dataclass
class PPOObjectiveConfig:
    """Rewards, advantages and the clipped loss of DP-PPO.

    Error messages name bare fields; the loader prefixes the section this config sits under.
    """

    gamma: float = 1.0
    """GAE discount per token (TRL: 1.0; the episode is one response)."""
    lam: float = 0.95
    """GAE lambda (TRL: 0.95)."""
    clip_eps: float = 0.2
    """PPO ratio clip: the surrogate ignores ratios outside [1 - clip_eps, 1 + clip_eps]."""
    value_clip: float = 0.2
    """Value clip around the rollout-time value; 0 disables value clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss in the one per-user loss (policy and value head share the DP step)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL to the reference: k1 = logp - logp_ref (TRL default), k3 = (r - 1) - log r (non-negative)."""
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    """fixed: beta = init_kl_coef throughout. adaptive: Ziegler et al. control toward kl_target, fed only
    released (noised) KL values or KL measured on public prompts."""
    init_kl_coef: float = 0.2
    """beta, the weight of -KL in the per-token reward (initial value when adaptive)."""
    kl_target: float = 6.0
    """adaptive: the KL (nats per sequence) beta is steered toward."""
    kl_horizon: float = 10000.0
    """adaptive: samples over which beta may change by at most a factor ~e^0.2."""
    advantage_estimator: Literal["gae", "rloo"] = "gae"
    """gae: a value head trained in the same DP step, GAE over each trajectory (TRL's PPO). rloo: no critic; each
    sample's return (score - beta * KL) minus the mean return of the other samples of the same prompt, on every
    action (REINFORCE leave-one-out, TRL's RLOOTrainer), still under the clipped ratio. Needs
    ``ppo.samples_per_prompt >= 2``; the value head is frozen and takes no share of the clipped norm. The samples
    of one prompt belong to one user, so the baseline never crosses users."""
    advantage_normalization: str = "none"
    """none | per_trajectory (whiten within one response) | fixed (divide by advantage_scale). Batch-wide
    whitening is refused: it couples users and breaks per-user sensitivity."""
    advantage_scale: float = 1.0
    """fixed: the public constant advantages are divided by (set it before the run, never from private data)."""
    reward_normalization: Literal["none", "public"] = "none"
    """none: the reward model's raw score. public: shift and scale the score to zero mean and unit standard
    deviation over the SFT policy's samples on the PUBLIC evaluation prompts, measured once before the first
    iteration. Post-processing of the DP reward model on public data, fixed before any D3 prompt is read, so no
    user's reward depends on another's (OpenRLHF's normalize_reward uses batch statistics instead, which couples
    users). Makes init_kl_coef mean the same for reward models of different scale: Bradley-Terry scores have no
    fixed scale, and a private reward model's spread differs from a non-private one's."""
    reward_norm_seeds: int = 2
    """public: samples per public prompt (each with its own seed) that the mean and deviation are measured on."""

    def check(self) -> None:
        require(0.0 <= self.gamma <= 1.0, "gamma", "must be in [0, 1]")
        require(0.0 <= self.lam <= 1.0, "lam", "must be in [0, 1]")
        require(0.0 < self.clip_eps < 1.0, "clip_eps", "must be in (0, 1)")
        require(self.value_clip >= 0.0, "value_clip", "must be >= 0 (0 disables value clipping)")
        require(self.vf_coef >= 0.0, "vf_coef", "must be >= 0")
        require(self.init_kl_coef >= 0.0, "init_kl_coef", "must be >= 0")
        if self.kl_controller == "adaptive":
            require(self.init_kl_coef > 0.0, "init_kl_coef", "must be > 0 with kl_controller=adaptive")
            require(self.kl_target > 0.0, "kl_target", "must be > 0")
            require(self.kl_horizon > 0.0, "kl_horizon", "must be > 0")
        require(self.advantage_estimator in ADVANTAGE_ESTIMATORS, "advantage_estimator",
                f"must be one of {', '.join(ADVANTAGE_ESTIMATORS)}")
        require(not (self.advantage_estimator == "rloo" and self.advantage_normalization == "per_trajectory"),
                "advantage_normalization", "per_trajectory whitens the one RLOO advantage of a trajectory to 0; "
                "use none or fixed with advantage_estimator=rloo")
        require(self.advantage_scale > 0.0, "advantage_scale", "must be > 0")
        require(self.reward_normalization in ("none", "public"), "reward_normalization", "must be none or public")
        require(self.reward_norm_seeds >= 1, "reward_norm_seeds", "must be >= 1")
        try:
            check_advantage_normalization(self.advantage_normalization, field="advantage_normalization")
        except ValueError as err:  # BatchWhiteningError included: the loader reports ConfigErrors
            raise ConfigError(str(err)) from None

    @property
    def critic(self) -> bool:
        """Whether the value head is trained (GAE) or frozen with no value loss (RLOO)."""
        return self.advantage_estimator == "gae"

    @property
    def value_clip_or_none(self) -> float | None:
        """``value_clip`` as ``ppo_loss_per_record`` takes it (None = no clipping)."""
        return self.value_clip if self.value_clip > 0.0 else None

    def build_kl_controller(self) -> FixedKLController | AdaptiveKLController:
        """A fresh KL controller as configured."""
        if self.kl_controller == "adaptive":
            return AdaptiveKLController(self.init_kl_coef, target=self.kl_target, horizon=self.kl_horizon)
        return FixedKLController(self.init_kl_coef)

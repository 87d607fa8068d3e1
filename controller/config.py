"""Config of the learned clip/noise controller (section ``controller``) and of its proxy pretraining environments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from controller.reward import REWARD_KINDS, RewardKind
from dpalign.config import require


@dataclass
class ProxyEnvConfig:
    """A proxy DP fine-tuning episode on PUBLIC text (no privacy is spent: the data is public; the accounting in
    the episode only teaches the controller how budgets behave).

    The defaults keep one episode to a few seconds on one CPU core.
    """

    n_layer: int = 2
    """Layers of the tiny GPT-2 the episode fine-tunes (vary it to train for transfer across depth)."""
    n_embd: int = 32
    """Hidden size of the tiny GPT-2."""
    n_head: int = 2
    """Attention heads (must divide n_embd)."""
    seq_len: int = 32
    """Tokens per example (bytes of a public review, truncated/padded)."""
    lora_r: int = 4
    """LoRA rank."""
    lora_targets: list[str] = field(default_factory=lambda: ["c_attn"])
    """LoRA target modules (each adapted module is one clipping group)."""
    base_pretrain_steps: int = 60
    """Non-private steps that pretrain the tiny base on public text before the DP episodes (once per env)."""
    train_texts: int = 256
    """Public texts the episode's DP fine-tune samples from (the stand-in for private users, one text each)."""
    valid_texts: int = 32
    """Held-out public texts for the validation loss (the reward)."""
    sampling_rate: float = 0.1
    """Poisson rate q of a DP step."""
    steps: int = 40
    """DP steps per episode."""
    interval: int = 5
    """DP steps per controller decision (per env step)."""
    target_epsilons: list[float] = field(default_factory=lambda: [1.0, 4.0])
    """Each episode draws its target epsilon from this list (the observation carries the ledger state)."""
    delta: float = 1e-5
    """Target delta."""
    reference_clip: float = 1.0
    """Reference clip threshold C_ref of every module."""
    lr: float = 5e-3
    """Adam learning rate of the LoRA fine-tune."""
    reward: RewardKind = "validation_gain"
    """The episode's reward, as in a private run (controller.reward; controller/reward.py)."""
    reward_scale: float = 100.0
    """Reward = reward_scale * (validation-loss decrease / initial loss) - privacy_penalty * (epsilon spent / target)."""
    privacy_penalty: float = 0.0
    """Penalty per unit of the target epsilon spent in the interval (epsilon spent / target)."""
    seed: int = 0
    """Seed of the public texts, the base model and the episodes."""
    threads: int = 1
    """torch intra-op threads of the env's process (1: parallel env runners do not fight over cores; 0: leave
    torch's setting alone)."""

    def check(self, prefix: str = "controller.env") -> None:
        require(self.n_layer >= 1, f"{prefix}.n_layer", "must be >= 1")
        require(
            self.n_embd >= 8 and self.n_embd % max(self.n_head, 1) == 0,
            f"{prefix}.n_embd",
            "must be >= 8 and divisible by n_head",
        )
        require(self.seq_len >= 4, f"{prefix}.seq_len", "must be >= 4")
        require(self.lora_r >= 1, f"{prefix}.lora_r", "must be >= 1")
        require(bool(self.lora_targets), f"{prefix}.lora_targets", "must name at least one module")
        require(self.base_pretrain_steps >= 0, f"{prefix}.base_pretrain_steps", "must be >= 0")
        require(self.train_texts >= 4, f"{prefix}.train_texts", "must be >= 4")
        require(self.valid_texts >= 1, f"{prefix}.valid_texts", "must be >= 1")
        require(0.0 < self.sampling_rate <= 1.0, f"{prefix}.sampling_rate", "must be in (0, 1]")
        require(self.steps >= 1, f"{prefix}.steps", "must be >= 1")
        require(1 <= self.interval <= self.steps, f"{prefix}.interval", "must be in [1, steps]")
        require(
            bool(self.target_epsilons) and all(e > 0 for e in self.target_epsilons),
            f"{prefix}.target_epsilons",
            "must be a non-empty list of numbers > 0",
        )
        require(0.0 < self.delta < 1.0, f"{prefix}.delta", "must be in (0, 1)")
        require(self.reference_clip > 0, f"{prefix}.reference_clip", "must be > 0")
        require(self.lr > 0, f"{prefix}.lr", "must be > 0")
        require(self.reward in REWARD_KINDS, f"{prefix}.reward", f"must be one of {', '.join(REWARD_KINDS)}")
        require(self.privacy_penalty >= 0, f"{prefix}.privacy_penalty", "must be >= 0")
        require(self.threads >= 0, f"{prefix}.threads", "must be >= 0")


@dataclass
class ControllerConfig:
    """The learned clip/noise controller (docs/design.md section 3). ``enabled: false`` runs the fixed DP-SGD schedule."""

    enabled: bool = False
    """Use the learned controller in the private stages."""
    mode: Literal["online", "frozen", "finetune"] = "online"
    """online: a fresh SAC learns inside the run; frozen: act with the loaded artifact, no learning; finetune:
    start from the loaded artifact and keep learning online."""
    load: str = ""
    """Artifact directory to load (required by frozen and finetune; must be empty for online)."""
    interval: int = 20
    """DP steps between two controller decisions. Measured on the clinical benchmark (README, "Learned
    controller"; 400 steps, 3 seeds): intervals 5 / 10 / 20 / 40 end within 0.6% of fixed DP-SGD alike, while the
    controller's share of step time (mostly its public validation loss, once a decision) falls 10% / 6% / 3% / 2%;
    20 keeps it under 5%."""
    granularity: Literal["bucket", "module", "lora_param"] = "bucket"
    """What one threshold action sets (controller/spaces.py): ``bucket`` one multiplier per depth bucket,
    interpolated to every group (spaces independent of the model: transfers across depths and stages); ``module``
    one per adapted module (needs engine.clipping=per_module); ``lora_param`` one per LoRA A and per LoRA B tensor
    (RLDP's pairwise grouping; needs engine.clipping=per_tensor). module / lora_param controllers fit only the
    model, LoRA targets and stage they were trained on."""
    buckets: int = 4
    """Depth buckets B of the observation/action spaces at granularity=bucket (independent of the number of LoRA
    modules)."""
    clip_range: float = 4.0
    """Per-module thresholds stay within [reference_clip / clip_range, reference_clip * clip_range]."""
    noise_range: float = 3.0
    """The noise multiplier stays within [floor, floor * noise_range] (the floor spends the budget exactly)."""
    reference_clip: float = 1.0
    """Reference threshold C_ref of every LoRA module (the fixed DP-SGD threshold)."""
    count_noise_std: float = 0.0
    """Std (in users) of the noise on per-module clip counts released each step for the clip_fraction feature;
    their cost is folded into the step's sigma_eff (the gradient gets correspondingly more noise). Raised to
    sqrt(#modules) * sigma when smaller, so counts never take more than a quarter of the step's precision.
    0 releases no counts."""
    max_noise_multiplier: float = 100.0
    """Upper bound on sigma for the budget layer's search."""
    learning_starts: int = 4
    """Online: decisions taken with the default action (fixed DP-SGD) before SAC acts and learns."""
    buffer_size: int = 10000
    """Online: replay buffer capacity (transitions)."""
    batch_size: int = 64
    """Online: SAC minibatch size."""
    learning_rate: float = 3e-4
    """SAC learning rate (actor, critics, entropy coefficient)."""
    gradient_steps: int = 4
    """Online: SAC gradient steps per decision."""
    ent_coef: str = "auto"
    """SAC's entropy coefficient: 'auto' (learnt, starting at 1), 'auto_X' (learnt, starting at X) or a fixed
    number. With rewards of order 0.1-1 the default's entropy term outweighs the reward for many decisions."""
    exploration: float = 0.3
    """Online/finetune: how far a decision's action goes from the policy's mean toward SAC's sampled action (1: SAC
    as is; 0: the mean, no exploration). Exploration is paid in utility within the run that explores: on the
    clinical benchmark (README, "Learned controller") 1 cost 2.4-2.6% held-out perplexity against fixed DP-SGD,
    0.3 and 0 were level with it (0.999-1.002x); 0.3 keeps some spread in what SAC learns from."""
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer sizes of the actor and critics (ReLU MLPs)."""
    reward: RewardKind = "validation_gain"
    """What a decision interval earns (controller/reward.py): ``validation_gain`` the relative decrease of the public
    validation loss; ``gain_per_budget`` RLDP's utility gain per unit of privacy spent (the same gain divided by the
    interval's share of the stage's RDP budget, relative to an even pace). Measured on the clinical benchmark
    (README, "Learned controller")."""
    reward_scale: float = 100.0
    """Reward = reward_scale * (validation-loss decrease / initial) - privacy_penalty * (epsilon spent / target);
    under ``gain_per_budget`` the gain is divided by the interval's budget share over an even pace's."""
    privacy_penalty: float = 0.0
    """Penalty per unit of the target epsilon spent in an interval (epsilon spent / target)."""
    seed: int = 0
    """Seed of the SAC networks and its exploration."""
    env: ProxyEnvConfig = field(default_factory=ProxyEnvConfig)
    """Proxy DP fine-tuning environments on public data (pretraining; no privacy cost)."""
    pretrain_trainer: Literal["rllib", "sb3"] = "rllib"
    """`dpalign controller pretrain`: RLlib SAC over parallel env runners, or SB3 SAC in-process."""
    pretrain_iterations: int = 20
    """RLlib training iterations (or SB3: episodes) of `dpalign controller pretrain`."""
    pretrain_env_runners: int = 2
    """RLlib env runners (parallel proxy environments) for pretraining; 0 samples in the driver."""
    out: str = "controller_artifact"
    """Directory `dpalign controller pretrain` writes the artifact to."""

    def check(self) -> None:
        if self.mode == "online":
            require(
                not self.load,
                "controller.load",
                "must be empty with controller.mode=online (use frozen or "
                "finetune to start from an artifact)",
            )
        else:
            require(
                bool(self.load), "controller.load", f"controller.mode={self.mode} needs an artifact directory"
            )
        require(self.interval >= 1, "controller.interval", "must be >= 1")
        require(
            self.granularity in ("bucket", "module", "lora_param"),
            "controller.granularity",
            "must be bucket, module or lora_param",
        )
        require(self.buckets >= 1, "controller.buckets", "must be >= 1")
        require(self.clip_range >= 1.0, "controller.clip_range", "must be >= 1")
        require(self.noise_range >= 1.0, "controller.noise_range", "must be >= 1")
        require(self.reference_clip > 0, "controller.reference_clip", "must be > 0")
        require(self.count_noise_std >= 0, "controller.count_noise_std", "must be >= 0 (0: no clip counts)")
        require(self.max_noise_multiplier > 0, "controller.max_noise_multiplier", "must be > 0")
        require(self.learning_starts >= 0, "controller.learning_starts", "must be >= 0")
        require(self.buffer_size >= 1, "controller.buffer_size", "must be >= 1")
        require(self.batch_size >= 1, "controller.batch_size", "must be >= 1")
        require(self.learning_rate > 0, "controller.learning_rate", "must be > 0")
        require(self.gradient_steps >= 0, "controller.gradient_steps", "must be >= 0")
        require(0.0 <= self.exploration <= 1.0, "controller.exploration", "must be in [0, 1]")
        require(_valid_ent_coef(self.ent_coef), "controller.ent_coef",
                f"{self.ent_coef!r} is not 'auto', 'auto_X' or a number, with X and the number > 0")
        require(
            bool(self.hidden) and all(h >= 1 for h in self.hidden),
            "controller.hidden",
            "must be a non-empty list of sizes >= 1",
        )
        require(self.reward in REWARD_KINDS, "controller.reward", f"must be one of {', '.join(REWARD_KINDS)}")
        require(self.privacy_penalty >= 0, "controller.privacy_penalty", "must be >= 0")
        require(self.pretrain_iterations >= 1, "controller.pretrain_iterations", "must be >= 1")
        require(self.pretrain_env_runners >= 0, "controller.pretrain_env_runners", "must be >= 0")
        self.env.check()

    def spec(self, group_names: Sequence[str] = ()):  # -> SpaceSpec (import kept local: config stays light)
        """The spaces of this config; module / lora_param need the engine's clipping-group names."""
        from controller.spaces import SpaceSpec

        return SpaceSpec(
            buckets=self.buckets,
            clip_range=self.clip_range,
            noise_range=self.noise_range,
            granularity=self.granularity,
            group_names=tuple(group_names) if self.granularity != "bucket" else (),
        )


def _valid_ent_coef(value: str) -> bool:
    """SB3's forms of an entropy coefficient: 'auto', 'auto_X' (X > 0) or a positive number."""
    text = str(value)
    if text == "auto":
        return True
    try:
        return float(text[5:] if text.startswith("auto_") else text) > 0
    except ValueError:
        return False

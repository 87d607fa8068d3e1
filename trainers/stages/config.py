"""Configs of the private alignment pipeline: privacy, LoRA, DP engine, the three stages and evaluation.

One dataclass per concern, each validated by ``check()`` at load time (before any privacy is spent); error messages
name bare fields and the loader prefixes the section (``ppo.objective.advantage_normalization: ...``).

Privacy decisions that depend on the data (the composition mode, the default delta, per-stage targets) are not config
values: they are computed from the stages' user ids by :func:`resolve_composition`, :func:`resolve_deltas` and
:func:`stage_targets`, so no flag can claim parallel composition over shared users (docs/design.md section 2).

Defaults are sized for the embedded task on 2 CPU cores: the three stages on the default tiny GPT-2 finish in
minutes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from dpalign.config import ConfigError, require
from trainers.rlhf.config import PPOObjectiveConfig

STAGES: tuple[str, ...] = ("sft", "rm", "ppo")
"""Pipeline stages in execution order."""
STAGE_DATA: dict[str, str] = {"sft": "D1", "rm": "D2", "ppo": "D3"}
"""Which private split each stage trains on."""
Preset = Literal["private", "nonprivate", "decoupled", "ppo_only"]


@dataclass(frozen=True)
class StageProtection:
    """Whether a stage trains with DP under a preset, and why (copied verbatim into report.json).

    Attributes:
        stage: "sft", "rm" or "ppo".
        private: True when the stage runs the DP engine and writes ledger events.
        reason: one sentence a reader of the report can check against the preset.
    """

    stage: str
    private: bool
    reason: str


def presets(preset: str) -> dict[str, StageProtection]:
    """Which stages are private under ``preset``, in stage order.

    * ``private`` (default): every stage is DP. The RM must be DP or PPO's gradients depend on all of D2; the SFT
      model must be DP because PPO's reference and initialization are built from it (docs/design.md section 2).
    * ``nonprivate``: no stage is DP (the baseline; no ledger events).
    * ``decoupled`` (Cho & Sun): only the reward model is DP; D1 and D3 are treated as public, so the policy is
      post-processing of the private RM and guarantees nothing for the users of D1 or D3.
    * ``ppo_only``: only PPO is DP; the SFT model and the reward model are trained on D1 and D2 without noise (as
      if public). D3's users are protected (PPO is the DP mechanism over D3; the SFT and reward models are fixed
      inputs to it); D1's and D2's are not. The mirror image of ``decoupled``: side by side, the two isolate what
      the private reward model and what DP-PPO each cost (the README's decomposition table), and it fits a team
      whose preference data is public but whose prompts are not.

    Raises:
        ValueError: unknown preset.
    """
    if preset == "private":
        return {
            "sft": StageProtection("sft", True, "DP-SFT on D1: every user of D1 is protected"),
            "rm": StageProtection("rm", True, "DP reward model on D2: every user of D2 is protected"),
            "ppo": StageProtection(
                "ppo", True, "DP-PPO on D3 with a DP reward model and DP SFT reference: every user of D3 is protected"
            ),
        }
    if preset == "nonprivate":
        return {
            name: StageProtection(name, False, f"preset nonprivate: {STAGE_DATA[name]} is trained on without DP")
            for name in STAGES
        }
    if preset == "decoupled":
        return {
            "sft": StageProtection("sft", False, "preset decoupled: D1 is treated as public (no protection)"),
            "rm": StageProtection("rm", True, "DP reward model on D2: every user of D2 is protected"),
            "ppo": StageProtection(
                "ppo",
                False,
                "preset decoupled: D3 prompts are treated as public; the policy is post-processing of the DP "
                "reward model, so D2 stays protected but D3 users are not",
            ),
        }
    if preset == "ppo_only":
        return {
            "sft": StageProtection("sft", False, "preset ppo_only: D1 is treated as public (no protection)"),
            "rm": StageProtection("rm", False, "preset ppo_only: D2 is treated as public (no protection)"),
            "ppo": StageProtection(
                "ppo",
                True,
                "DP-PPO on D3 with a non-private reward model and SFT reference (fixed inputs): every user of D3 is "
                "protected, D1 and D2 users are not",
            ),
        }
    raise ValueError(f"preset={preset!r} is unknown; allowed: 'private', 'nonprivate', 'decoupled', 'ppo_only'")


@dataclass
class PrivacyConfig:
    """The run's (epsilon, delta) target, how it is shared across stages, and the accountant."""

    preset: Preset = "private"
    """private: all three stages DP (default). nonprivate: none (the baseline). decoupled: only the reward model
    is DP, D1 and D3 are treated as public (Cho & Sun). ppo_only: only PPO is DP, D1 and D2 are treated as public
    (with decoupled, the decomposition of what each private stage costs). The report states exactly what was
    protected."""
    target_epsilon: float = 4.0
    """The run's epsilon. Under parallel composition (disjoint stage users) every private stage gets all of it;
    under sequential composition each stage gets its share below."""
    delta: float | None = None
    """The run's delta. null: min(0.1/N, 1/(N ln N)), well below 1/N (a mechanism with delta = 1/N may publish one
    user's data outright), where N is the number of users of the stage under parallel composition, or of all
    private users together under sequential composition (see resolve_deltas). Set 1/N to reproduce Wu et al."""
    composition: Literal["auto", "sequential"] = "auto"
    """auto: parallel when no user is in two private stages, sequential otherwise -- the mode follows from the
    data's user ids, never from a flag. sequential: compose sequentially even over disjoint users (only
    over-counts). There is no way to claim parallel composition."""
    sft_share: float | None = None
    """Sequential composition: share of (epsilon, delta) given to DP-SFT. The three shares must all be set and sum
    to 1; when users overlap across stages and the shares are null, the run is refused before any step."""
    rm_share: float | None = None
    """Sequential composition: share of (epsilon, delta) given to the DP reward model."""
    ppo_share: float | None = None
    """Sequential composition: share of (epsilon, delta) given to DP-PPO."""
    accountant: Literal["pld", "rdp"] = "pld"
    """pld: tight accounting for schedules fixed before the run. rdp: RDP privacy filter at an order fixed before
    the run, valid under adaptive composition (required by adaptive clipping and the learned controller)."""
    rdp_order: float | None = None
    """accountant=rdp: the filter's order. null: chosen before the run as the best order for the planned
    schedule (accounting.accountants.choose_rdp_order)."""
    secure_rng: bool = False
    """Draw the Poisson samples and the DP noise from a cryptographically secure generator (SHAKE-256 keyed by the
    stage's secret, Gaussians summed from two float64 Box-Muller draws, as Opacus' secure_mode) instead of torch's
    Mersenne Twister keyed by the same secret. Costs time per step (benchmarks/dp_overhead.py --secure-rng)."""

    def check(self) -> None:
        require(
            math.isfinite(self.target_epsilon) and self.target_epsilon > 0,
            "target_epsilon",
            "must be a finite number > 0",
        )
        if self.delta is not None:
            require(0.0 < self.delta < 1.0, "delta", "must be in (0, 1), or null for min(0.1/N, 1/(N ln N))")
        shares = self.shares
        if shares is not None:
            for name, share in shares.items():
                require(0.0 <= share <= 1.0, f"{name}_share", f"must be in [0, 1], got {share}")
            total = math.fsum(shares.values())
            require(
                abs(total - 1.0) <= 1e-9,
                "ppo_share",
                f"sft_share + rm_share + ppo_share must sum to 1, got {total:g}",
            )
        elif any(s is not None for s in (self.sft_share, self.rm_share, self.ppo_share)):
            raise ConfigError(
                "sft_share: set all three of sft_share, rm_share, ppo_share (summing to 1), or none of them"
            )
        if self.rdp_order is not None:
            require(self.accountant == "rdp", "rdp_order", "is only meaningful with accountant=rdp")
            require(self.rdp_order > 1.0 and math.isfinite(self.rdp_order), "rdp_order", "must be > 1")

    @property
    def shares(self) -> dict[str, float] | None:
        """``{"sft": s, "rm": s, "ppo": s}`` when all three shares are set, else None."""
        values = (self.sft_share, self.rm_share, self.ppo_share)
        if any(v is None for v in values):
            return None
        return dict(zip(STAGES, (float(v) for v in values), strict=False))  # type: ignore[arg-type]

    @property
    def private_stages(self) -> tuple[str, ...]:
        """Stages that run with DP under this preset, in order."""
        return tuple(name for name, p in presets(self.preset).items() if p.private)


class CompositionError(ValueError):
    """Private stages share users but the config does not say how to split the budget across them."""


class PlanError(ValueError):
    """The config's schedule is impossible for the data (e.g. a stage's expected batch exceeds its users: q > 1).
    Raised while planning, before a run directory exists or any privacy is spent."""


def resolve_composition(privacy: PrivacyConfig, stage_user_ids: Mapping[str, Iterable[str]]) -> str:
    """The composition mode of the PRIVATE stages, from their user ids; refuses an unconfigured overlap.

    Public stages spend no budget, so only the private stages' user sets are compared.

    Returns:
        "parallel" or "sequential".

    Raises:
        CompositionError: users appear in two private stages and the budget shares are not configured (raised
            before any step, so nothing is spent), or a private stage's share is 0 under sequential composition.
    """
    from accounting.composition import composition_mode

    private = {name: list(stage_user_ids[name]) for name in privacy.private_stages if name in stage_user_ids}
    missing = [name for name in privacy.private_stages if name not in stage_user_ids]
    if missing:
        raise CompositionError(f"private stage(s) {missing} have no user ids; pass every private stage's users")
    if not private:
        return "parallel"
    mode, overlap = composition_mode(private)
    if privacy.composition == "sequential":
        mode = "sequential"
    if mode == "sequential":
        shares = privacy.shares
        if shares is None:
            why = (
                f"{overlap} users appear in more than one private stage"
                if overlap
                else "privacy.composition=sequential"
            )
            raise CompositionError(
                f"{why}, so the stages compose sequentially and the budget must be split: set privacy.sft_share, "
                "privacy.rm_share and privacy.ppo_share (summing to 1), or split the data by user so no user is in "
                "two stages (data.shared_users=0)"
            )
        zero = [name for name in privacy.private_stages if shares[name] <= 0.0]
        if zero:
            raise CompositionError(
                f"privacy.{zero[0]}_share is 0 but stage {zero[0]!r} is private under preset "
                f"{privacy.preset!r}: a private stage needs a positive share of the budget"
            )
    return mode


def _private_share(privacy: PrivacyConfig) -> dict[str, float]:
    """Shares renormalized over the private stages (a public stage spends nothing, so its share is not wasted)."""
    shares = privacy.shares
    if shares is None:
        raise CompositionError("sequential composition needs privacy.sft_share, rm_share and ppo_share")
    total = math.fsum(shares[name] for name in privacy.private_stages)
    return {name: shares[name] / total for name in privacy.private_stages}


def default_delta(num_users: int) -> float:
    """The default delta for N users: min(0.1/N, 1/(N ln N)).

    Why not 1/N (Wu et al.): the mechanism "publish each user's data with probability delta" is (0, delta)-DP and
    leaks about delta*N users outright; delta must be well below 1/N. 0.1/N is the threshold ``dpalign privacy``
    warns at; 1/(N ln N) is the customary bound and the smaller of the two for N > e^10 (about 22,000 users).
    """
    if num_users < 1:
        raise ValueError(f"num_users={num_users}: must be >= 1")
    n = float(num_users)
    return min(0.1 / n, 1.0 / (n * math.log(n))) if n > 1 else 0.1


def resolve_deltas(
    privacy: PrivacyConfig, *, mode: str, stage_num_users: Mapping[str, int], union_num_users: int
) -> tuple[float, dict[str, float]]:
    """The run's delta and each private stage's delta.

    * ``privacy.delta`` set: the run's delta is that value; parallel stages each get it, sequential stages get
      their share of it (basic composition of the deltas, as ``accounting.calibration.split_budget``).
    * null, parallel: stage delta = :func:`default_delta` (N_stage), run delta = the largest of them (a parallel
      composition of (eps, delta_k)-DP stages is (eps, max delta_k)-DP).
    * null, sequential: run delta = :func:`default_delta` over the union of the private stages' users, split by
      the shares.

    Args:
        mode: "parallel" or "sequential" (from :func:`resolve_composition`).
        stage_num_users: N per private stage.
        union_num_users: number of distinct users over all private stages.
    """
    stages = privacy.private_stages
    for name in stages:
        if stage_num_users.get(name, 0) < 1:
            raise ValueError(f"stage {name!r} is private but has no users; it cannot be trained")
    if mode == "parallel":
        if privacy.delta is not None:
            return privacy.delta, {name: privacy.delta for name in stages}
        per_stage = {name: default_delta(stage_num_users[name]) for name in stages}
        return (max(per_stage.values()) if per_stage else 0.0), per_stage
    if mode != "sequential":
        raise ValueError(f"mode must be 'parallel' or 'sequential', got {mode!r}")
    if union_num_users < 1:
        raise ValueError("union_num_users must be >= 1 under sequential composition")
    run_delta = privacy.delta if privacy.delta is not None else default_delta(union_num_users)
    shares = _private_share(privacy)
    return run_delta, {name: run_delta * shares[name] for name in stages}


def stage_targets(privacy: PrivacyConfig, *, mode: str) -> dict[str, float]:
    """Target epsilon of each private stage: the whole target (parallel) or its share (sequential)."""
    if mode == "parallel":
        return {name: privacy.target_epsilon for name in privacy.private_stages}
    shares = _private_share(privacy)
    return {name: privacy.target_epsilon * shares[name] for name in privacy.private_stages}


@dataclass
class LoraConfig:
    """A LoRA adapter (peft) on the base model: the only trainable weights besides a stage's head."""

    r: int = 4
    """Adapter rank (Wu et al.: 4)."""
    alpha: float = 16.0
    """Scaling numerator: the update is alpha / r * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter input. Keep 0 in DP stages: per-user gradients must be deterministic functions of
    the user's data for the clipping bound to mean what it says."""
    target_modules: list[str] = field(default_factory=lambda: ["c_attn"])
    """Module-name suffixes to adapt (GPT-2: c_attn is the fused query/key/value projection)."""

    def check(self) -> None:
        require(self.r >= 1, "r", "must be >= 1")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        require(bool(self.target_modules), "target_modules", "must name at least one module (e.g. [c_attn])")


@dataclass
class EngineConfig:
    """How the DP engine clips and noises per-user gradients (docs/design.md section 2, "Mechanism")."""

    clipping: Literal["per_module", "per_tensor", "flat"] = "per_module"
    """Clipping groups: per_module (one LoRA module, A and B together; default), per_tensor (each parameter
    tensor), flat (one threshold over all trainable parameters). Noise is scaled so sigma_eff is what the ledger
    records."""
    clip_norm: float = 1.0
    """C: the per-user L2 bound (flat) or the L2 norm of the vector of group thresholds (per_module/per_tensor;
    each group starts at C / sqrt(#groups))."""
    policy: Literal["fixed", "per_layer", "adaptive"] = "fixed"
    """Thresholds: fixed (set before the run), per_layer (fixed, C_k proportional to sqrt(group size) with ||C||_2 = clip_norm: one per-coordinate threshold), adaptive
    (Andrew et al. 2021 quantile tracking from noisy clip counts; needs privacy.accountant=rdp)."""
    adaptive_quantile: float = 0.5
    """adaptive: the fraction of users whose update should be unclipped."""
    adaptive_lr: float = 0.2
    """adaptive: geometric learning rate of the threshold (C <- C * exp(-lr * (clipped_frac - (1 - quantile))))."""
    count_noise_std: float | None = None
    """adaptive: std of the Gaussian noise on each clip count, in users. null: expected batch size / 20 (Andrew
    et al.). Its cost is accounted with the gradient (one Gaussian mechanism with a combined multiplier)."""
    max_physical_batch_records: int = 16
    """Most records in one forward/backward pass (memory bound only; sampling and the update are per user, so
    this changes no number)."""

    def check(self) -> None:
        require(self.clip_norm > 0 and math.isfinite(self.clip_norm), "clip_norm", "must be a finite number > 0")
        require(0.0 < self.adaptive_quantile < 1.0, "adaptive_quantile", "must be in (0, 1)")
        require(self.adaptive_lr > 0, "adaptive_lr", "must be > 0")
        if self.count_noise_std is not None:
            require(self.count_noise_std > 0, "count_noise_std", "must be > 0, or null for batch/20")
        require(self.max_physical_batch_records >= 1, "max_physical_batch_records", "must be >= 1")


def _sampling_rate(expected_users: int, num_users: int, field_name: str) -> float:
    if num_users < 1:
        raise PlanError(f"{field_name}: the stage has no users")
    q = expected_users / num_users
    if q > 1.0:
        raise PlanError(
            f"{field_name}={expected_users} exceeds the stage's {num_users} users (sampling rate q > 1); "
            f"lower it to at most {num_users} or add users"
        )
    return q


@dataclass
class PoissonStageConfig:
    """The public schedule of a stage trained by Poisson-sampled noisy steps (shared by SFT and the reward model)."""

    steps: int = 0
    """Noisy optimizer steps. 0: derived from epochs (steps = ceil(epochs * N / expected_batch_users))."""
    epochs: float = 2.0
    """Expected passes over the stage's users when steps=0 (each step samples every user with rate q)."""
    expected_batch_users: int = 32
    """B = q * N, the expected number of users per Poisson-sampled step; the noisy sum is divided by B (public),
    never by the realized batch size (Wu et al. use 512 on IMDb)."""
    lr: float = 5e-3
    """Adam learning rate of the trainable weights (LoRA, and a head if the stage has one)."""
    max_len: int = 64
    """Tokens per record (prompt + response or completion) after truncation."""

    def check(self) -> None:
        require(self.steps >= 0, "steps", "must be >= 0 (0: derived from epochs)")
        require(self.steps > 0 or self.epochs > 0, "epochs", "must be > 0 when steps=0")
        require(self.expected_batch_users >= 1, "expected_batch_users", "must be >= 1")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.max_len >= 8, "max_len", "must be >= 8")

    def sampling_rate(self, num_users: int) -> float:
        """q = expected_batch_users / N for a stage of ``num_users`` users (ValueError when q > 1)."""
        return _sampling_rate(self.expected_batch_users, num_users, "expected_batch_users")

    def num_steps(self, num_users: int) -> int:
        """``steps`` or, when 0, ceil(epochs / q)."""
        if self.steps:
            return self.steps
        return max(1, math.ceil(self.epochs / self.sampling_rate(num_users)))


@dataclass
class SFTConfig(PoissonStageConfig):
    """DP-SFT on D1: causal-LM loss on response tokens (prompt masked), LoRA on the base model."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """The SFT adapter."""


@dataclass
class RewardModelConfig(PoissonStageConfig):
    """DP reward model on D2: the SFT model plus a scalar head and a LoRA, Bradley-Terry loss per user."""

    gold_pairs: int = 128
    """Held-out preference pairs labeled by the gold oracle (public, never trained on) for pairwise accuracy."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The reward model's adapter (on top of the SFT weights)."""

    def check(self) -> None:
        super().check()
        require(self.gold_pairs >= 1, "gold_pairs", "must be >= 1")


@dataclass
class PPOConfig:
    """DP-PPO on D3: policy = SFT + new LoRA, frozen SFT reference, value head trained in the same DP step."""

    iterations: int = 12
    """PPO iterations; each Poisson-samples users of D3, rolls out their prompts and takes ppo_epochs passes."""
    expected_users_per_iteration: int = 24
    """B = q * N, expected users per iteration (the public normalizer of every noisy update of the iteration)."""
    ppo_epochs: int = 1
    """K passes over one sampled batch. Accounted as ONE Poisson-sampled event of K Gaussian releases of the same
    sample (multiplier sigma_eff / sqrt(K)), never as K fresh steps. Wu et al. use 1 to keep accounting simple."""
    samples_per_prompt: int = 1
    """G: responses generated per sampled prompt. All G belong to the prompt's user, whose per-user gradient sums
    them before clipping, so G changes compute, not sensitivity. G >= 2 gives ``objective.advantage_estimator=
    rloo`` its leave-one-out baseline (the other samples of the same prompt)."""
    minibatches: int = 1
    """Noisy updates per epoch over disjoint slices of the sampled users (each user is in exactly one slice, so
    one epoch is one release per user). 1: one update per epoch over the whole sample."""
    lr: float = 3e-3
    """Adam learning rate of the policy LoRA and the value head."""
    max_new_tokens: int = 24
    """Tokens generated per prompt during rollouts."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (PPO needs on-policy samples: keep 1.0)."""
    top_k: int = 0
    """Top-k filter of rollouts; 0 disables it (on-policy sampling)."""
    rollout_actors: int = 2
    """Ray actors generating rollouts; only the LoRA weights are synced to them after each iteration. 0 generates
    in the learner's process without Ray (same seeds, same samples; for debugging and fast tests)."""
    rollout_cpus_per_actor: int = 1
    """Ray CPUs reserved by each rollout actor, and its torch threads. The actors run inside the run's Ray (started
    or joined from ``ray.*``), next to the Ray Train learners (``ray.cpus_per_worker`` each)."""
    rollout_batch_size: int = 16
    """Prompts per generate call on an actor; batch i uses seed + i, so results do not depend on the actor count."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The policy adapter (new, on top of the SFT weights)."""
    objective: PPOObjectiveConfig = field(default_factory=PPOObjectiveConfig)
    """Rewards, GAE and the clipped loss: beta (KL) fixed or adaptive, gamma=1.0, lam=0.95, clip_eps=0.2,
    value_clip, vf_coef, advantage_normalization (none | per_trajectory | fixed; batch whitening is refused)."""

    def check(self) -> None:
        require(self.iterations >= 1, "iterations", "must be >= 1")
        require(self.expected_users_per_iteration >= 1, "expected_users_per_iteration", "must be >= 1")
        require(self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1")
        require(self.minibatches >= 1, "minibatches", "must be >= 1")
        require(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")
        require(
            self.objective.advantage_estimator != "rloo" or self.samples_per_prompt >= 2,
            "samples_per_prompt",
            "must be >= 2 with objective.advantage_estimator=rloo: the leave-one-out baseline of a sample is the "
            "other samples of the same prompt",
        )
        require(
            self.minibatches == 1,
            "minibatches",
            "only 1 is supported: every noisy update of an iteration is one release of the whole Poisson sample "
            "(accounted as repeats); splitting the sample into minibatches needs per-part accounting that the "
            "engine does not implement yet",
        )
        require(self.lr > 0, "lr", "must be > 0")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0 (PPO samples on-policy)")
        require(self.top_k >= 0, "top_k", "must be >= 0 (0: off)")
        require(self.rollout_actors >= 0, "rollout_actors", "must be >= 0 (0: generate in-process, no Ray)")
        require(self.rollout_batch_size >= 1, "rollout_batch_size", "must be >= 1")
        require(self.rollout_cpus_per_actor >= 1, "rollout_cpus_per_actor", "must be >= 1")

    def sampling_rate(self, num_users: int) -> float:
        """q = expected_users_per_iteration / N (ValueError when q > 1)."""
        return _sampling_rate(self.expected_users_per_iteration, num_users, "expected_users_per_iteration")


@dataclass
class EvalConfig:
    """Evaluation of the base, SFT and final policies on held-out public prompts."""

    prompts: int = 64
    """Held-out evaluation prompts used (at most data.eval_prompts)."""
    max_new_tokens: int = 24
    """Tokens generated per prompt."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    top_k: int = 0
    """Top-k filter; 0 disables it."""
    batch_size: int = 32
    """Prompts per generate call (generation is seeded per batch)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Generation seeds; every (prompt, seed) sample enters the mean gold reward and its 95% interval."""
    perplexity_records: int = 128
    """Held-out public records used for perplexity."""

    def check(self) -> None:
        require(self.prompts >= 2, "prompts", "must be >= 2 (a confidence interval needs two samples)")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        require(self.temperature >= 0, "temperature", "must be >= 0 (0: greedy)")
        require(self.top_k >= 0, "top_k", "must be >= 0 (0: off)")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(bool(self.seeds), "seeds", "must list at least one seed")
        require(all(s >= 0 for s in self.seeds), "seeds", "must be >= 0")
        require(len(set(self.seeds)) == len(self.seeds), "seeds", "must be distinct")
        require(self.perplexity_records >= 1, "perplexity_records", "must be >= 1")


def check_pipeline(privacy: PrivacyConfig, engine: EngineConfig) -> None:
    """Cross-section rules (call from the root config's check, before any step).

    Raises:
        ConfigError: adaptive clipping with the PLD accountant: PLD is valid only for schedules fixed in advance,
            and adaptively chosen thresholds need the RDP privacy filter (docs/design.md section 2, "Adaptivity").
    """
    if engine.policy == "adaptive" and privacy.accountant != "rdp" and privacy.private_stages:
        raise ConfigError(
            "engine.policy: adaptive clipping chooses thresholds from earlier noisy outputs, so the ledger needs "
            "an accountant valid under adaptive composition; set privacy.accountant=rdp"
        )

"""Observation and action spaces of the controller at three granularities (``controller.granularity``).

GRANULARITY. Let the engine have K clipping groups in model order (``engine.clipping``: ``per_module`` makes one
group per adapted LoRA module, A and B together, plus one per trainable head; ``per_tensor`` one group per tensor,
i.e. each LoRA A and each LoRA B separately, and each head tensor). The controller acts on S "slots":

| granularity | slots S                     | engine.clipping | what one action entry sets                   | transfers to   |
|-------------|-----------------------------|-----------------|----------------------------------------------|----------------|
| bucket      | B = controller.buckets      | any             | the threshold multiplier at a depth-bucket    | other depths,  |
|             |                             |                 | centre, interpolated to every group's depth   | seeds, stages  |
| module      | K (one per adapted module)  | per_module      | the threshold multiplier of that module       | same model and |
|             |                             |                 |                                               | stage only     |
| lora_param  | K (one per LoRA A, LoRA B)  | per_tensor      | the threshold multiplier of that tensor       | same model and |
|             |                             |                 | (RLDP's pairwise A/B grouping)                | stage only     |

Observation: S x len(MODULE_FEATURES) per-slot features (slot-major: the 4 features of slot 0, then slot 1, ...)
followed by len(GLOBAL_FEATURES) globals: a Box of 4 S + 7. Action: a Box [-1, 1]^(S + 1) (S clip entries, then
sigma). At ``module`` and ``lora_param`` granularity the per-group features are the feature table's rows for each
group as released (no pooling) and the spec records the group names it was built for (``SpaceSpec.group_names``):
an artifact applies only to an engine with exactly those groups (:meth:`SpaceSpec.check_groups`).

Bucket choice: depth buckets. Module k of K sits at relative depth x_k = (k + 1/2) / K. Per-module features are
pooled into B fixed buckets with centres c_b = (b + 1/2) / B (mean over the modules whose depth falls in the
bucket, or linear interpolation of the neighbouring modules' values at c_b when a bucket holds none, e.g. a
2-layer model with 4 buckets). Actions are B clip multipliers at the bucket centres, linearly interpolated (in log
space) back to each module's depth. A 2-layer and a 12-layer model therefore see the same Box spaces, and the
policy's decision is a smooth function of relative depth, which is what transfers across depths of one family.

Why buckets rather than a shared per-module network: both SAC implementations we train with (stable-baselines3
online, RLlib for pretraining) take fixed Box spaces and an MLP policy. Buckets plug straight into both, and the
exported actor is a plain MLP over one fixed vector. A per-module network needs custom (and, for the twin
critics, set-valued) models in both libraries. The cost is resolution: with B buckets the controller cannot give
two modules in one bucket different thresholds (the interpolation does separate modules at different depths);
``module`` and ``lora_param`` give that resolution back at the price of transfer (the MLP's input and output
sizes are the model's group count).

Actions (each in [-1, 1], a Box of S + 1):
    a_s  -> clip multiplier m_s = clip_range ** a_s. bucket: C_k = C_ref_k * exp(interp(x_k; c, log m));
            module / lora_param: C_k = C_ref_k * m_k. Either way C_k lies in [C_ref / clip_range, C_ref * clip_range].
    a_sig -> sigma = sigma_floor * noise_range ** max(0, a_sig), in [floor, floor * noise_range]. a_sig <= 0 is
            the floor: the fixed DP-SGD schedule calibrated to spend the whole budget in the planned steps. The
            budget layer (controller/budget.py) clamps again, whatever the actor outputs.
The zero action is therefore fixed DP-SGD exactly (reference thresholds, sigma at the floor): an untrained actor,
whose tanh-squashed mean starts near 0, begins at the baseline and explores around it. (Spaces version 1 put the
floor at a_sig = -1, the edge of the box, so a fresh actor started at sigma = floor * sqrt(noise_range): measured
on the clinical benchmark, that cost the online controller 0.5-0.7 and the pretrained one 1.9-2.5
percentage points of held-out perplexity against fixed DP-SGD.)
Noise is isotropic over modules (s_k = sigma * ||C||_2, so sigma_eff = sigma exactly).

FEATURE TABLE. Source: (a) released noisy aggregate, free post-processing; (b) privatized statistic, cost in the
ledger; (c) public / non-private validation data, free; (d) ledger state and the controller's own public choices,
free.

Per slot (bucket: pooled over the bucket's groups; module / lora_param: the group's own value):
| feature        | definition                                                                  | src | cost |
|----------------|-----------------------------------------------------------------------------|-----|------|
| log_snr        | log(||g~_k||^2 / (d_k s_k^2 / B^2)), clipped to [-5, 10]: the released        | (a) | free: function of
|                | update's energy over the noise energy the public (s_k, d_k, B) predict       |     | the release  |
| cos_prev       | cosine of g~_k with the previous step's g~_k (gradient agreement)            | (a) | free |
| log_clip_mult  | log(C_k / C_ref_k) / log(clip_range): the threshold in use                   | (d) | free (public choice) |
| clip_fraction  | noisy fraction of sampled users clipped in group k, clipped to [-0.5, 1.5],  | (b) | the clip-count event:
|                | from the released CENTRED count sum_u (b_uk - 1/2) + N(0, sigma_b^2) plus   |     | Andrew et al. bits, composed
|                | the public B/2 (the accounted quantity); 0 when no counts are released      |     | into the step's event |
Global:
| progress             | steps_done / steps_total                                              | (d) | free |
| eps_spent_frac       | epsilon_spent / target_epsilon                                        | (d) | free |
| log_sigma_over_floor | log(sigma_current / sigma_floor)                                      | (d) | free |
| log_floor_over_ref   | log(sigma_floor / sigma_reference): how tight the remaining budget is  | (d) | free |
| val_loss_rel         | validation loss / initial validation loss - 1                          | (c) | free (public data) |
| val_improvement      | (previous - current validation loss) / initial, over the last interval | (c) | free (public data) |
| has_clip_counts      | 1 when the engine releases noisy clip counts, else 0                   | (d) | free (config) |

No-leak rule, structurally: :func:`features_from_released` takes a :class:`controller.records.Released`, a
:class:`LedgerState` and :class:`ValidationStats` and nothing else; those records accept only Python scalars
(never tensors or batches), and the released ones are built by the engine after noising.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from controller.records import LedgerState, Released, ValidationStats

SPACES_VERSION = 2
"""2: the zero action is fixed DP-SGD (version 1 put the noise floor at a_sig = -1; its artifacts are refused)."""
MODULE_FEATURES: tuple[str, ...] = ("log_snr", "cos_prev", "log_clip_mult", "clip_fraction")
GLOBAL_FEATURES: tuple[str, ...] = (
    "progress",
    "eps_spent_frac",
    "log_sigma_over_floor",
    "log_floor_over_ref",
    "val_loss_rel",
    "val_improvement",
    "has_clip_counts",
)
GRANULARITIES: tuple[str, ...] = ("bucket", "module", "lora_param")
ENGINE_CLIPPING = {"module": "per_module", "lora_param": "per_tensor"}
"""The ``engine.clipping`` each per-group granularity needs (bucket works with any)."""
OBS_BOUND = 20.0
"""Every raw feature lies in [-OBS_BOUND, OBS_BOUND] (the Box bounds)."""


class SpaceMismatch(ValueError):
    """Spaces (an artifact's, or a controller's) that do not fit the engine's clipping groups."""


def relative_depths(num: int) -> np.ndarray:
    """x_k = (k + 1/2) / num for k < num: the centres of num equal slices of [0, 1]."""
    if num < 1:
        raise ValueError(f"need at least one module/bucket, got {num}")
    return (np.arange(num, dtype=np.float64) + 0.5) / num


def pool_to_buckets(values: Sequence[float], buckets: int) -> np.ndarray:
    """[K] per-module values -> [B] bucket values: mean of the modules in each bucket, interpolated when empty."""
    v = np.asarray(values, dtype=np.float64)  # [K]
    x = relative_depths(len(v))  # [K]
    c = relative_depths(buckets)  # [B]
    idx = np.minimum((x * buckets).astype(int), buckets - 1)  # [K] bucket of each module
    out = np.interp(c, x, v)  # [B] fallback for empty buckets
    for b in range(buckets):
        members = v[idx == b]
        if members.size:
            out[b] = members.mean()
    return out


def spread_to_modules(bucket_values: Sequence[float], num_modules: int) -> np.ndarray:
    """[B] bucket values -> [K] module values by linear interpolation at each module's depth (flat at the ends)."""
    b = np.asarray(bucket_values, dtype=np.float64)
    return np.interp(relative_depths(num_modules), relative_depths(len(b)), b)


@dataclass(frozen=True)
class SpaceSpec:
    """The observation/action contract shared by the env, the online and frozen policies, and the artifact.

    Attributes:
        buckets: number of depth buckets B (used by ``granularity="bucket"``).
        clip_range: clip thresholds range over [C_ref / clip_range, C_ref * clip_range].
        noise_range: sigma ranges over [floor, floor * noise_range].
        version: spaces version (features and their order); artifacts record it.
        granularity: ``bucket``, ``module`` or ``lora_param`` (module docstring).
        group_names: module / lora_param: the engine's clipping-group names in order, one slot each (empty for
            bucket, whose spaces do not depend on the model).
    """

    buckets: int = 4
    clip_range: float = 4.0
    noise_range: float = 3.0
    version: int = SPACES_VERSION
    granularity: str = "bucket"
    group_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_names", tuple(str(n) for n in self.group_names))
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r}: use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "bucket" and self.group_names:
            raise ValueError("granularity 'bucket' has model-independent spaces: group_names must be empty")
        if self.granularity != "bucket" and not self.group_names:
            raise ValueError(f"granularity {self.granularity!r} needs the engine's clipping-group names")
        if self.buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {self.buckets}")
        if not (self.clip_range >= 1.0) or math.isinf(self.clip_range):
            raise ValueError(f"clip_range must be a finite number >= 1, got {self.clip_range}")
        if not (self.noise_range >= 1.0) or math.isinf(self.noise_range):
            raise ValueError(f"noise_range must be a finite number >= 1, got {self.noise_range}")

    @property
    def slots(self) -> int:
        """S: per-group entries of the spaces (B buckets, or one per clipping group)."""
        return self.buckets if self.granularity == "bucket" else len(self.group_names)

    @property
    def obs_dim(self) -> int:
        return self.slots * len(MODULE_FEATURES) + len(GLOBAL_FEATURES)

    @property
    def act_dim(self) -> int:
        return self.slots + 1

    def check_groups(self, names: Sequence[str]) -> None:
        """Refuse an engine whose clipping groups are not the ones these spaces were built for.

        Raises:
            SpaceMismatch: module / lora_param spaces and different group names (count or order).
        """
        if self.granularity == "bucket":
            return
        got = tuple(str(n) for n in names)
        if got == self.group_names:
            return
        missing = [n for n in self.group_names if n not in got]
        extra = [n for n in got if n not in self.group_names]
        raise SpaceMismatch(
            f"the controller's {self.granularity} spaces were built for {len(self.group_names)} clipping groups "
            f"but the engine has {len(got)} (not in the engine: {missing[:3]}; not in the controller: {extra[:3]}). "
            f"A {self.granularity} controller only fits the model, LoRA targets, engine.clipping and stage it "
            "was trained on; use controller.granularity=bucket to transfer across models and stages"
        )

    def observation_space(self) -> Any:
        import gymnasium as gym

        return gym.spaces.Box(-OBS_BOUND, OBS_BOUND, shape=(self.obs_dim,), dtype=np.float32)

    def action_space(self) -> Any:
        import gymnasium as gym

        return gym.spaces.Box(-1.0, 1.0, shape=(self.act_dim,), dtype=np.float32)

    def default_action(self) -> np.ndarray:
        """The fixed DP-SGD action: reference thresholds everywhere, sigma at the floor (all zeros)."""
        return np.zeros(self.act_dim, dtype=np.float32)

    def decode_action(
        self, action: Sequence[float], *, reference_clips: Sequence[float], sigma_floor: float
    ) -> tuple[tuple[float, ...], float]:
        """(C_k per module, sigma) from an action in [-1, 1]^(B+1); out-of-range or NaN entries are clamped
        (NaN -> the default action's value), so no actor output can leave the bounds."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != self.act_dim:
            raise ValueError(f"action has {a.shape[0]} entries, the spec expects {self.act_dim}")
        a = np.where(np.isnan(a), self.default_action().astype(np.float64), a)
        a = np.clip(a, -1.0, 1.0)
        refs = np.asarray(reference_clips, dtype=np.float64)  # [K]
        if self.granularity == "bucket":
            log_mult = spread_to_modules(a[:-1] * math.log(self.clip_range), len(refs))  # [K]
        else:
            if refs.shape[0] != self.slots:
                raise SpaceMismatch(f"{refs.shape[0]} reference clips for {self.slots} {self.granularity} slots")
            log_mult = a[:-1] * math.log(self.clip_range)  # [K]: one entry per group
        clips = tuple(float(c) for c in refs * np.exp(log_mult))
        sigma = float(sigma_floor * self.noise_range ** max(0.0, a[-1]))
        return clips, sigma

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["group_names"] = list(self.group_names)
        d["module_features"] = list(MODULE_FEATURES)
        d["global_features"] = list(GLOBAL_FEATURES)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpaceSpec:
        if int(d.get("version", -1)) != SPACES_VERSION:
            raise ValueError(
                f"spaces version {d.get('version')!r} is not supported (this code: {SPACES_VERSION})"
            )
        if list(d.get("module_features", MODULE_FEATURES)) != list(MODULE_FEATURES) or list(
            d.get("global_features", GLOBAL_FEATURES)
        ) != list(GLOBAL_FEATURES):
            raise ValueError(
                "the artifact's feature list differs from this code's; retrain or use a matching version"
            )
        return cls(
            buckets=int(d["buckets"]),
            clip_range=float(d["clip_range"]),
            noise_range=float(d["noise_range"]),
            version=int(d["version"]),
            granularity=str(d.get("granularity", "bucket")),  # artifacts from before granularities: buckets
            group_names=tuple(d.get("group_names", ())),
        )


def features_from_released(
    released: Released,
    ledger: LedgerState,
    validation: ValidationStats,
    *,
    spec: SpaceSpec,
    reference_clips: Sequence[float],
) -> np.ndarray:
    """The observation [spec.obs_dim] (float32) built from released values, ledger state and public validation.

    Raises:
        TypeError: when ``released``/``ledger``/``validation`` are not the controller's records (e.g. a raw batch
            or a tensor): the controller may see nothing else.
    """
    if not isinstance(released, Released):
        raise TypeError(
            f"features_from_released needs a controller.records.Released, got {type(released).__name__}: the "
            "controller observes only what the engine released after noising"
        )
    if not isinstance(ledger, LedgerState):
        raise TypeError(f"ledger must be a LedgerState, got {type(ledger).__name__}")
    if not isinstance(validation, ValidationStats):
        raise TypeError(f"validation must be ValidationStats, got {type(validation).__name__}")
    k = released.num_groups
    refs = np.asarray(reference_clips, dtype=np.float64)
    if refs.shape != (k,):
        raise ValueError(f"{refs.shape[0] if refs.ndim else 1} reference clips for {k} released groups")

    b = released.expected_batch_size
    sizes = np.asarray(released.group_sizes, dtype=np.float64)  # [K]
    stds = np.asarray(released.noise_stds, dtype=np.float64)  # [K]
    noise_energy = sizes * (stds / b) ** 2  # [K] E||noise_k / B||^2
    energy = np.asarray(released.noisy_grad_sq_norms, dtype=np.float64)  # [K]
    log_snr = np.clip(np.log(np.maximum(energy, 1e-30) / noise_energy), -5.0, 10.0)
    cos_prev = np.clip(np.asarray(released.noisy_cos_prev, dtype=np.float64), -1.0, 1.0)
    log_clip = np.log(np.asarray(released.clip_norms, dtype=np.float64) / refs) / max(
        math.log(spec.clip_range), 1e-12
    )
    has_counts = released.noisy_clip_fractions is not None
    fractions = (
        np.clip(np.asarray(released.noisy_clip_fractions, dtype=np.float64), -0.5, 1.5)
        if has_counts
        else np.zeros(k)
    )
    per_module = [log_snr, cos_prev, np.clip(log_clip, -2.0, 2.0), fractions]
    if spec.granularity == "bucket":
        slots = np.stack([pool_to_buckets(f, spec.buckets) for f in per_module], axis=1)  # [B, F]
    else:
        spec.check_groups(released.group_names)
        slots = np.stack(per_module, axis=1)  # [K, F]: each group's own row, no pooling

    g = [
        ledger.steps_done / max(ledger.steps_total, 1),
        ledger.epsilon_spent / ledger.target_epsilon,
        math.log(ledger.sigma_current / ledger.sigma_floor),
        math.log(ledger.sigma_floor / ledger.sigma_reference),
        validation.loss / validation.initial_loss - 1.0,
        (validation.previous_loss - validation.loss) / validation.initial_loss,
        1.0 if has_counts else 0.0,
    ]
    obs = np.concatenate([slots.reshape(-1), np.asarray(g, dtype=np.float64)])
    return np.clip(obs, -OBS_BOUND, OBS_BOUND).astype(np.float32)


def initial_observation(ledger: LedgerState, *, spec: SpaceSpec) -> np.ndarray:
    """The observation before any release: per-bucket features at their neutral values, ledger features set."""
    obs = np.zeros(spec.obs_dim, dtype=np.float32)
    g0 = spec.slots * len(MODULE_FEATURES)
    obs[g0 + 0] = ledger.steps_done / max(ledger.steps_total, 1)
    obs[g0 + 1] = ledger.epsilon_spent / ledger.target_epsilon
    obs[g0 + 2] = math.log(ledger.sigma_current / ledger.sigma_floor)
    obs[g0 + 3] = math.log(ledger.sigma_floor / ledger.sigma_reference)
    return obs

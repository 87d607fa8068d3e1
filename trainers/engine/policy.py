"""Clip/noise policies: what threshold C_k and noise std s_k each clipping group gets at each step.

The engine asks ``policy.plan(step, groups)`` before every logical step and calls ``policy.observe(released)``
after every release. A policy sees ONLY released quantities (``ReleasedStep``: the noisy gradient, the noisy clip
counts, its own plan) and public facts (group names and sizes, the step, the public batch size) -- never raw
per-user norms, which would be an unaccounted release (docs/design.md section 3). The learned controller implements the
same protocol.

The engine never trusts a policy's own claim about privacy: it recomputes sigma_eff from (C_k, s_k) and the count
noise with ``accounting.mechanisms`` (``StepPlan.effective_noise_multiplier``) and writes THAT into the ledger.

The sqrt(K) trap (K groups): noise s_k = sigma * C_k on each group gives sigma_eff = sigma / sqrt(K), not sigma.
Isotropic noise s_k = sigma * ||C||_2 (same std everywhere) or proportional noise s_k = sigma * sqrt(K) * C_k both
give sigma_eff = sigma; the policies below use them and check the result against the accounting helper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor

from accounting.mechanisms import (
    adaptive_clipping_multiplier,
    effective_noise_multiplier,
    grad_noise_for_target,
)


@dataclass(frozen=True)
class GroupSpec:
    """Public description of one clipping group.

    Attributes:
        name: stable name (LoRA module name such as ``transformer.h.0.attn.c_attn``, a head's module name, a
            parameter name for per-tensor grouping, or ``"all"`` for flat clipping).
        numel: number of scalars in the group (sum over its tensors).
        param_names: the parameter names in the group, in module order.
    """

    name: str
    numel: int
    param_names: tuple[str, ...]


@dataclass(frozen=True)
class StepPlan:
    """Thresholds and noise of one logical step (all its releases, if the sample is reused).

    Attributes:
        clip_norms: C_k > 0 per group (L2 threshold of each user's group-k gradient); ``inf`` only in
            non-private mode.
        noise_stds: s_k >= 0 per group, the std of the Gaussian added to the group-k SUM of clipped
            contributions (before dividing by the public batch size).
        count_noise_std: sigma_b of the Gaussian added to each group's count of unclipped users (adaptive
            clipping); None releases no counts.
    """

    clip_norms: tuple[float, ...]
    noise_stds: tuple[float, ...]
    count_noise_std: float | None = None

    def __post_init__(self) -> None:
        if len(self.clip_norms) != len(self.noise_stds):
            raise ValueError(f"StepPlan: {len(self.clip_norms)} clip norms but {len(self.noise_stds)} noise stds")
        for k, (c, s) in enumerate(zip(self.clip_norms, self.noise_stds, strict=True)):
            if not c > 0 or math.isnan(c):
                raise ValueError(f"StepPlan: clip_norms[{k}]={c}: must be > 0 (inf allowed only non-privately)")
            if not s >= 0 or math.isinf(s):
                raise ValueError(f"StepPlan: noise_stds[{k}]={s}: must be finite and >= 0")
        if self.count_noise_std is not None and not (0 < self.count_noise_std < math.inf):
            raise ValueError(f"StepPlan: count_noise_std={self.count_noise_std}: must be finite and > 0, or None")

    @property
    def num_groups(self) -> int:
        return len(self.clip_norms)

    def effective_noise_multiplier(self) -> float:
        """sigma_eff of one release: the gradient's (sum_k C_k^2/s_k^2)^(-1/2), with the clip counts folded in.

        Raises:
            ValueError: the plan is not private (a group with s_k = 0 or C_k = inf).
        """
        if any(math.isinf(c) for c in self.clip_norms):
            raise ValueError("StepPlan: an infinite clip norm has unbounded sensitivity: not a private plan")
        z_grad = effective_noise_multiplier(clip_norms=self.clip_norms, noise_stds=self.noise_stds)
        if self.count_noise_std is None:
            return z_grad
        return adaptive_clipping_multiplier(
            grad_noise_multiplier=z_grad, count_noise_std=self.count_noise_std, num_counts=self.num_groups
        )


@dataclass(frozen=True)
class ReleasedStep:
    """Everything a policy may observe about one release: only noised quantities and public constants.

    Attributes:
        step: logical step index.
        release: index of this release within the step (0 .. repeats-1; PPO epochs over one sample).
        plan: the plan the release was made with.
        groups: the public group descriptions (same order as the plan).
        noisy_grads: per group, the released gradient tensors (noisy sum / B), in ``GroupSpec.param_names``
            order. Post-processing of the release: free to use.
        noisy_grad_norms: per group, the L2 norm of ``noisy_grads`` (also post-processing).
        noisy_unclipped_counts: per group, an estimate of the number of users whose group norm was <= C_k:
            the CENTRED release sum_u (b_uk - 1/2) + N(0, sigma_b^2) (sensitivity 1/2, as accounted) plus the
            public B/2. None when the plan released no counts.
        expected_batch_size: the public B = q * N.
    """

    step: int
    release: int
    plan: StepPlan
    groups: tuple[GroupSpec, ...]
    noisy_grads: tuple[tuple[Tensor, ...], ...]
    noisy_grad_norms: tuple[float, ...]
    noisy_unclipped_counts: tuple[float, ...] | None
    expected_batch_size: float


@runtime_checkable
class ClipNoisePolicy(Protocol):
    """The protocol every clip/noise policy (fixed, per-layer, adaptive, learned controller) implements."""

    def plan(self, step: int, groups: Sequence[GroupSpec]) -> StepPlan:
        """Thresholds and noise for logical step ``step``; may depend only on earlier ``observe`` calls."""
        ...

    def observe(self, released: ReleasedStep) -> None:
        """Called after every release (several per step when a sample is reused)."""
        ...


class FixedPolicy:
    """DP-SGD: one threshold C for every group and isotropic noise s_k = sigma * ||C||_2 = sigma * C * sqrt(K).

    sigma_eff = sigma exactly (with K groups each clipped to C, the user's whole contribution has norm <=
    C * sqrt(K), and the noise is calibrated to that). With ``grouping="flat"`` K = 1 and this is textbook DP-SGD.

    ``noise_multiplier=0`` and ``clip_norm=inf`` are accepted for the engine's NON-private mode only (clipping
    baselines, and the sigma=0 / C=inf equality test); the private engine refuses such a plan.
    """

    def __init__(self, *, noise_multiplier: float, clip_norm: float) -> None:
        if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
            raise ValueError(f"FixedPolicy: noise_multiplier={noise_multiplier}: must be finite and >= 0")
        if not clip_norm > 0:
            raise ValueError(f"FixedPolicy: clip_norm={clip_norm}: must be > 0")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)

    def plan(self, step: int, groups: Sequence[GroupSpec]) -> StepPlan:
        k = len(groups)
        total = self.clip_norm * math.sqrt(k)  # ||C||_2 with C_k = C for all k
        std = 0.0 if self.noise_multiplier == 0.0 else self.noise_multiplier * total
        return StepPlan(clip_norms=(self.clip_norm,) * k, noise_stds=(std,) * k)

    def observe(self, released: ReleasedStep) -> None:
        return None


class PerLayerFixedPolicy:
    """Per-group thresholds C_k with noise chosen so that sigma_eff equals the target ``noise_multiplier``.

    ``noise_allocation``:
      * ``"isotropic"``: s_k = sigma * ||C||_2 for every group (the same std everywhere);
      * ``"proportional"``: s_k = sigma * sqrt(K) * C_k (each group's noise scales with its threshold; small
        groups get less noise). NOT sigma * C_k: that is the sqrt(K) trap, sigma_eff = sigma / sqrt(K).
    Both give sigma_eff = sigma; the constructor-time check runs the accounting helper on the plan.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norms: Sequence[float] | Mapping[str, float],
        noise_allocation: Literal["isotropic", "proportional"] = "isotropic",
    ) -> None:
        if not (0 < noise_multiplier < math.inf):
            raise ValueError(f"PerLayerFixedPolicy: noise_multiplier={noise_multiplier}: must be finite and > 0")
        if noise_allocation not in ("isotropic", "proportional"):
            raise ValueError(
                f"PerLayerFixedPolicy: noise_allocation={noise_allocation!r}: use 'isotropic' or 'proportional'"
            )
        values = list(clip_norms.values()) if isinstance(clip_norms, Mapping) else list(clip_norms)
        if not values or any(not (0 < c < math.inf) for c in values):
            raise ValueError(f"PerLayerFixedPolicy: clip_norms={values}: need at least one, each finite and > 0")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norms = clip_norms
        self.noise_allocation = noise_allocation

    def _norms_for(self, groups: Sequence[GroupSpec]) -> tuple[float, ...]:
        if isinstance(self.clip_norms, Mapping):
            names = [g.name for g in groups]
            missing = [n for n in names if n not in self.clip_norms]
            extra = [n for n in self.clip_norms if n not in names]
            if missing or extra:
                raise ValueError(
                    f"PerLayerFixedPolicy: clip_norms keys must be exactly the group names; missing {missing[:3]}, "
                    f"unknown {extra[:3]} (groups: {names[:4]}...)"
                )
            return tuple(float(self.clip_norms[n]) for n in names)
        if len(self.clip_norms) != len(groups):
            raise ValueError(
                f"PerLayerFixedPolicy: {len(self.clip_norms)} clip norms for {len(groups)} groups "
                f"({[g.name for g in groups][:4]}...)"
            )
        return tuple(float(c) for c in self.clip_norms)

    def plan(self, step: int, groups: Sequence[GroupSpec]) -> StepPlan:
        norms = self._norms_for(groups)
        k = len(norms)
        if self.noise_allocation == "isotropic":
            total = math.sqrt(sum(c * c for c in norms))
            stds = tuple(self.noise_multiplier * total for _ in norms)
        else:
            stds = tuple(self.noise_multiplier * math.sqrt(k) * c for c in norms)
        plan = StepPlan(clip_norms=norms, noise_stds=stds)
        got = plan.effective_noise_multiplier()
        if not math.isclose(got, self.noise_multiplier, rel_tol=1e-9):  # guards the allocation formulas
            raise AssertionError(f"PerLayerFixedPolicy: sigma_eff {got} != target {self.noise_multiplier}")
        return plan

    def observe(self, released: ReleasedStep) -> None:
        return None


class AdaptiveClippingPolicy:
    """Adaptive clipping (Andrew et al. 2021): each group's C_k tracks the ``target_quantile`` of user norms.

    Each release also publishes, per group, the count of users whose group norm was <= C_k plus N(0, sigma_b^2)
    (Andrew et al.'s centred bits have sensitivity 1/2 each; K counts). After each release:

        b_k = noisy_count_k / B,   C_k <- C_k * exp(-lr * (b_k - target_quantile))

    (geometric update; B = q*N is the public expected batch size). The counts cost privacy: the gradient noise is
    raised so that the COMBINED release has sigma_eff = ``noise_multiplier``:
    z_grad = grad_noise_for_target(target, sigma_b, K), s_k = z_grad * ||C||_2 (isotropic). Andrew et al.
    suggest sigma_b ~ B / 20; it must exceed sqrt(K) * sigma / 2 or there is no budget left for the gradient.

    With a sample reused for several releases (PPO epochs) the plan is fixed for the whole step and C is updated
    after each release (each release's counts are part of that release, hence of the event's repeats).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        initial_clip_norm: float,
        count_noise_std: float,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        min_clip_norm: float = 1e-6,
    ) -> None:
        if not (0 < noise_multiplier < math.inf):
            raise ValueError(f"AdaptiveClippingPolicy: noise_multiplier={noise_multiplier}: must be finite, > 0")
        if not (0 < initial_clip_norm < math.inf):
            raise ValueError(f"AdaptiveClippingPolicy: initial_clip_norm={initial_clip_norm}: must be finite, > 0")
        if not (0 < count_noise_std < math.inf):
            raise ValueError(f"AdaptiveClippingPolicy: count_noise_std={count_noise_std}: must be finite, > 0")
        if not 0 < target_quantile < 1:
            raise ValueError(f"AdaptiveClippingPolicy: target_quantile={target_quantile}: must be in (0, 1)")
        if not learning_rate > 0:
            raise ValueError(f"AdaptiveClippingPolicy: learning_rate={learning_rate}: must be > 0")
        self.noise_multiplier = float(noise_multiplier)
        self.count_noise_std = float(count_noise_std)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.min_clip_norm = float(min_clip_norm)
        self.initial_clip_norm = float(initial_clip_norm)
        self.clip_norms: list[float] | None = None  # set on the first plan (needs the number of groups)

    def plan(self, step: int, groups: Sequence[GroupSpec]) -> StepPlan:
        k = len(groups)
        if self.clip_norms is None:
            self.clip_norms = [self.initial_clip_norm] * k
        if len(self.clip_norms) != k:
            raise ValueError(f"AdaptiveClippingPolicy: tracks {len(self.clip_norms)} groups, engine has {k}")
        z_grad = grad_noise_for_target(
            target_multiplier=self.noise_multiplier, count_noise_std=self.count_noise_std, num_counts=k
        )
        total = math.sqrt(sum(c * c for c in self.clip_norms))
        return StepPlan(
            clip_norms=tuple(self.clip_norms),
            noise_stds=(z_grad * total,) * k,
            count_noise_std=self.count_noise_std,
        )

    def observe(self, released: ReleasedStep) -> None:
        counts = released.noisy_unclipped_counts
        if counts is None or self.clip_norms is None:
            raise ValueError("AdaptiveClippingPolicy.observe: the release carries no clip counts")
        b = released.expected_batch_size
        for k, count in enumerate(counts):
            frac = count / b
            updated = released.plan.clip_norms[k] * math.exp(-self.learning_rate * (frac - self.target_quantile))
            self.clip_norms[k] = max(self.min_clip_norm, updated)

    def state_dict(self) -> dict[str, object]:
        return {"clip_norms": None if self.clip_norms is None else list(self.clip_norms)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        norms = state.get("clip_norms")
        self.clip_norms = None if norms is None else [float(c) for c in norms]  # type: ignore[union-attr]


def group_thresholds(engine_cfg: Any, groups: Sequence[Any]) -> tuple[float, ...]:
    """Per-group thresholds C_k with ||C||_2 = engine.clip_norm, from PUBLIC facts only (group sizes).

    ``fixed``/``adaptive`` start every group at C / sqrt(K); ``per_layer`` gives each group a share
    proportional to sqrt(numel_k), i.e. the same per-coordinate threshold everywhere, so a large head is not
    starved next to small LoRA modules.
    """
    c = float(engine_cfg.clip_norm)
    k = len(groups)
    if engine_cfg.policy != "per_layer":
        return (c / math.sqrt(k),) * k
    weights = [math.sqrt(g.numel) for g in groups]
    norm = math.sqrt(sum(w * w for w in weights))
    return tuple(c * w / norm for w in weights)

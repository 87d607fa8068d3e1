"""Planted bugs: deliberately broken variants of the DP engine, for the audit tests ONLY.

Nothing in a config, the CLI or a stage recipe can reach this module: a bug is chosen by a test calling
:func:`buggy_engine_factory` (or building :class:`ShuffledUserSampler`), and the result is handed to
``trainers.audit.whitebox.run_whitebox_audit``. Each variant subclasses the real ``DPEngine`` and changes ONE thing
between what the engine does and what it records, exactly as the real bug would:

- ``CLIPPING_DISABLED``: per-user gradients are summed unclipped; the event still claims the plan's sigma_eff.
- ``NOISE_SCALED_DOWN``: the noise std is divided by ``factor`` (e.g. a std/variance mix-up).
- ``INDEPENDENT_WORKER_NOISE``: N data-parallel workers each add INDEPENDENT noise of std s/N (the shared-seed
  formula used with independent seeds); the sum of N such draws has std s/sqrt(N). Drawn here as one Gaussian of
  std s/sqrt(N), which is the same distribution.
- ``NOISE_DIVIDED_TWICE``: the noise is divided by the public batch size B once more (noise/B^2 next to sum/B).
- ``SQRT_K_TRAP``: per-group noise s_k = sigma * C_k (sigma_eff = sigma / sqrt(K)) while the event records the
  policy's sigma -- the engine trusting the policy's claim instead of recomputing sigma_eff.
- ``PPO_EPOCHS_AS_FRESH``: K releases of one sample recorded as K fresh Poisson events (repeats=1 each) instead of
  one event with repeats=K.
- ``RAW_CLIP_COUNTS``: the clip counts are released raw (sum of b_uk, sensitivity 1) while the event is
  accounted with centred counts (sensitivity 1/2) -- dpalign's own bug until the soundness fix. Flagged by the
  sensitivity audit (``trainers.audit.sensitivity``): one added user moves each count by 1 > 1/2.
- ``SHUFFLED_AS_POISSON``: fixed-size batches from a per-epoch shuffle, accounted as Poisson with q = B/N. The
  one-run white-box audit has little power here at any epsilon it can certify; the bug is caught on the sampler's
  inclusion statistics (``accounting.audit.sampling.poisson_inclusion_test``).

The variants override the engine's ``clip_and_sum`` (public) and its private ``_private_release`` /
``_admit_and_record`` hooks; if the engine changes shape, the planted-bug tests fail loudly rather than pass.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from accounting.events import PrivacyEvent
from trainers.engine.engine import DPEngine
from trainers.engine.policy import GroupSpec, ReleasedStep, StepPlan
from trainers.engine.sampling import step_seed


class PlantedBug(enum.Enum):
    """The deliberately broken engine variants (see the module docstring)."""

    CLIPPING_DISABLED = "clipping_disabled"
    NOISE_SCALED_DOWN = "noise_scaled_down"
    INDEPENDENT_WORKER_NOISE = "independent_worker_noise"
    NOISE_DIVIDED_TWICE = "noise_divided_twice"
    SQRT_K_TRAP = "sqrt_k_trap"
    PPO_EPOCHS_AS_FRESH = "ppo_epochs_as_fresh"
    SHUFFLED_AS_POISSON = "shuffled_as_poisson"
    RAW_CLIP_COUNTS = "raw_clip_counts"


class _NoiseBugEngine(DPEngine):
    """Releases with noise std s_k * noise_scale while the event (built from the plan) claims s_k."""

    noise_scale: float = 1.0

    def _private_release(
        self, batch: Any, loss_fn: Any, step: int, release: int, plan: StepPlan
    ) -> tuple[list[Tensor], ReleasedStep]:
        weaker = replace(plan, noise_stds=tuple(s * self.noise_scale for s in plan.noise_stds))
        return super()._private_release(batch, loss_fn, step, release, weaker)


class _NoClipEngine(DPEngine):
    def clip_and_sum(
        self, per_user: list[Tensor], clip_norms: Sequence[float]
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        return super().clip_and_sum(per_user, [math.inf] * len(clip_norms))


class _RawCountsEngine(DPEngine):
    """Releases sum_u b_uk + noise (no centring, no B/2 offset) while sigma_eff assumes sensitivity 1/2."""

    @staticmethod
    def centred_counts(counts: Tensor, num_users: int) -> Tensor:
        return counts

    def count_offset(self) -> float:
        return 0.0


class SqrtKTrapPolicy:
    """The trap: s_k = sigma * C_k on every group, and a ``noise_multiplier`` attribute claiming sigma."""

    def __init__(self, *, noise_multiplier: float, clip_norm: float) -> None:
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)

    def plan(self, step: int, groups: Sequence[GroupSpec]) -> StepPlan:
        k = len(groups)
        return StepPlan(
            clip_norms=(self.clip_norm,) * k, noise_stds=(self.noise_multiplier * self.clip_norm,) * k
        )

    def observe(self, released: ReleasedStep) -> None:
        return None


class _TrustingEngine(DPEngine):
    """Records the policy's claimed sigma instead of recomputing sigma_eff from (C_k, s_k)."""

    def _admit_and_record(self, step: int, plan: StepPlan | None, repeats: int) -> PrivacyEvent:
        event = PrivacyEvent(
            stage=self.stage,
            step=step,
            purpose="gradient",
            sampling_rate=self.sampling_rate,
            noise_multiplier=float(self.policy.noise_multiplier),  # type: ignore[union-attr]
            repeats=repeats,
        )
        assert self.event_sink is not None
        self.event_sink(event)
        return event


class _FreshEpochsEngine(DPEngine):
    """Records K releases of one sample as K fresh Poisson events (repeats=1) instead of one with repeats=K."""

    def _admit_and_record(self, step: int, plan: StepPlan | None, repeats: int) -> PrivacyEvent:
        assert plan is not None and self.event_sink is not None
        event = PrivacyEvent(
            stage=self.stage,
            step=step,
            purpose="gradient",
            sampling_rate=self.sampling_rate,
            noise_multiplier=plan.effective_noise_multiplier(),
            repeats=1,
        )
        for _ in range(repeats):
            self.event_sink(event)
        return event


def buggy_engine_factory(bug: PlantedBug, *, factor: float = 8.0) -> Any:
    """A drop-in for ``DPEngine(...)`` with ``bug`` planted (for ``run_whitebox_audit(engine_factory=...)``).

    Args:
        factor: NOISE_SCALED_DOWN: the noise is divided by it; INDEPENDENT_WORKER_NOISE: the number of workers N.
            Ignored by the other bugs.

    Raises:
        ValueError: SHUFFLED_AS_POISSON is a sampler bug (use :class:`ShuffledUserSampler`), or factor <= 1.
    """
    if not factor > 1.0:
        raise ValueError(f"factor={factor}: a planted bug needs factor > 1")

    def build(model: Any, **kwargs: Any) -> DPEngine:
        if bug is PlantedBug.CLIPPING_DISABLED:
            return _NoClipEngine(model, **kwargs)
        if bug in (
            PlantedBug.NOISE_SCALED_DOWN,
            PlantedBug.INDEPENDENT_WORKER_NOISE,
            PlantedBug.NOISE_DIVIDED_TWICE,
        ):
            engine = _NoiseBugEngine(model, **kwargs)
            if bug is PlantedBug.NOISE_SCALED_DOWN:
                engine.noise_scale = 1.0 / factor
            elif bug is PlantedBug.INDEPENDENT_WORKER_NOISE:
                engine.noise_scale = 1.0 / math.sqrt(factor)  # N draws of std s/N sum to std s/sqrt(N)
            else:
                engine.noise_scale = 1.0 / engine.expected_batch_size  # (sum + noise/B) / B
            return engine
        if bug is PlantedBug.SQRT_K_TRAP:
            policy = kwargs.pop("policy")
            trap = SqrtKTrapPolicy(noise_multiplier=policy.noise_multiplier, clip_norm=policy.clip_norm)
            return _TrustingEngine(model, policy=trap, **kwargs)
        if bug is PlantedBug.PPO_EPOCHS_AS_FRESH:
            return _FreshEpochsEngine(model, **kwargs)
        if bug is PlantedBug.RAW_CLIP_COUNTS:
            return _RawCountsEngine(model, **kwargs)
        raise ValueError(f"{bug}: not an engine bug; for SHUFFLED_AS_POISSON use ShuffledUserSampler")

    return build


class ShuffledUserSampler:
    """The SHUFFLED_AS_POISSON bug's sampler: each epoch a seeded permutation of the users is cut into
    round(1/q) batches of (nearly) equal size; every user is in exactly one batch per epoch. Same interface as
    ``PoissonUserSampler`` (it is what a buggy recipe would plug in while still accounting Poisson(q))."""

    def __init__(self, num_users: int, *, sampling_rate: float, seed: int) -> None:
        if num_users < 1 or not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"num_users={num_users}, sampling_rate={sampling_rate}: need >= 1 and (0, 1]")
        self.num_users = int(num_users)
        self.sampling_rate = float(sampling_rate)
        self.seed = int(seed)
        self.batches_per_epoch = max(1, round(1.0 / sampling_rate))

    @property
    def expected_batch_size(self) -> float:
        return self.sampling_rate * self.num_users

    def sample(self, step: int) -> Tensor:
        """Sorted int64 indices of step ``step``'s fixed-size batch, [~N q]."""
        epoch, index = divmod(step, self.batches_per_epoch)
        gen = torch.Generator().manual_seed(step_seed(self.seed, epoch, "shuffle"))
        perm = torch.randperm(self.num_users, generator=gen)  # [N]
        return torch.sort(torch.tensor_split(perm, self.batches_per_epoch)[index]).values

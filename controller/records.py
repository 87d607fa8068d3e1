"""The only records a controller may read: what the engine released after noising, the ledger, public validation.

These are the controller's whole view of a private run (docs/design.md section 2, "Extra releases", and section 3).
They hold plain Python floats and ints, never tensors, batches or per-user values: the constructor rejects
anything else, so a raw per-example norm cannot be smuggled in by accident, and a record can cross a process
boundary (Ray) as is.

``Released`` mirrors the engine's released record (trainers/engine); ``controller.policy`` adapts the engine's
record into it field by field, so the feature function never sees the engine's internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from accounting.events import PrivacyEvent


def _floats(name: str, values: Any, n: int | None = None) -> tuple[float, ...]:
    """A tuple of finite Python floats; refuses tensors/arrays (they could be private raw values)."""
    if not isinstance(values, (tuple, list)):
        raise TypeError(
            f"Released.{name}: expected a tuple of floats, got {type(values).__name__}; a released record holds "
            "scalars computed from noised aggregates, never tensors or batches"
        )
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"Released.{name}[{i}]: expected a Python float, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"Released.{name}[{i}]: must be finite, got {v}")
        out.append(float(v))
    if n is not None and len(out) != n:
        raise ValueError(f"Released.{name}: {len(out)} values for {n} groups")
    return tuple(out)


@dataclass(frozen=True)
class Released:
    """What one DP step released, per clipping group k (one LoRA module, or one LoRA A / B tensor when the engine
    clips per tensor), after the noise was added.

    Every field is either public (configuration the controller chose or the engine fixed before the step) or a
    function of the noised release (post-processing, free), or a privatized statistic whose PrivacyEvent is in
    ``events`` (it is refused otherwise).

    Attributes:
        step: the engine step that made the release (0-based).
        group_names: module names in model order (public).
        group_sizes: number of trainable parameters d_k per group (public).
        clip_norms: thresholds C_k used at this step (public: chosen before the step).
        noise_stds: std s_k of the Gaussian noise added to group k's clipped SUM (public).
        expected_batch_size: q * N, the public normalizer B of the update (never the realized batch size).
        noisy_grad_sq_norms: ||g~_k||^2 of the released update g~_k = (sum_u clip_k(g_uk) + N(0, s_k^2 I)) / B
            (post-processing of the release).
        noisy_cos_prev: cosine between g~_k at this step and at the previous step (post-processing; 0 at step 0).
        noisy_clip_fractions: privatized fraction of sampled users clipped in group k (adaptive-clipping style
            noisy counts divided by B), or None when the engine released no counts. Needs a "clip_count" (or a
            combined "gradient") event with its noise in ``events``.
        events: the PrivacyEvents the ledger recorded for this step (its cost).
    """

    step: int
    group_names: tuple[str, ...]
    group_sizes: tuple[int, ...]
    clip_norms: tuple[float, ...]
    noise_stds: tuple[float, ...]
    expected_batch_size: float
    noisy_grad_sq_norms: tuple[float, ...]
    noisy_cos_prev: tuple[float, ...]
    noisy_clip_fractions: tuple[float, ...] | None = None
    events: tuple[PrivacyEvent, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        k = len(self.group_names)
        if k == 0:
            raise ValueError("Released.group_names: at least one group")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise TypeError(f"Released.step: expected an int >= 0, got {self.step!r}")
        names = tuple(str(n) for n in self.group_names)
        sizes = tuple(self.group_sizes)
        if len(sizes) != k or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in sizes):
            raise ValueError(f"Released.group_sizes: {k} positive ints expected, got {sizes!r}")
        object.__setattr__(self, "group_names", names)
        object.__setattr__(self, "group_sizes", sizes)
        for name in ("clip_norms", "noise_stds", "noisy_grad_sq_norms", "noisy_cos_prev"):
            object.__setattr__(self, name, _floats(name, getattr(self, name), k))
        if self.noisy_clip_fractions is not None:
            object.__setattr__(
                self, "noisy_clip_fractions", _floats("noisy_clip_fractions", self.noisy_clip_fractions, k)
            )
            if not any(e.purpose in ("clip_count", "gradient") for e in self.events):
                raise ValueError(
                    "Released.noisy_clip_fractions given without a privacy event: a privatized statistic must be "
                    "accounted (add the clip_count or combined gradient event to Released.events)"
                )
        ebs = self.expected_batch_size
        if isinstance(ebs, bool) or not isinstance(ebs, (int, float)) or not (ebs > 0) or math.isinf(ebs):
            raise ValueError(f"Released.expected_batch_size: must be a finite float > 0, got {ebs!r}")
        object.__setattr__(self, "expected_batch_size", float(ebs))
        if any(s <= 0 for s in self.noise_stds):
            raise ValueError("Released.noise_stds: every group must have noise std > 0")
        events = tuple(self.events)
        if not all(isinstance(e, PrivacyEvent) for e in events):
            raise TypeError("Released.events: expected PrivacyEvent values")
        object.__setattr__(self, "events", events)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)


@dataclass(frozen=True)
class LedgerState:
    """The ledger's state as the controller sees it (all of it is public bookkeeping).

    Attributes:
        target_epsilon, delta: the stage's budget.
        epsilon_spent: epsilon of every event so far (under the run's adaptive accountant).
        steps_done: steps released so far.
        steps_total: steps the stage plans to run.
        sigma_floor: smallest noise multiplier that still lets every remaining step run within budget.
        sigma_reference: the multiplier of the fixed schedule calibrated at the start (the floor at step 0).
        sigma_current: the multiplier of the last step (sigma_reference before the first step).
    """

    target_epsilon: float
    delta: float
    epsilon_spent: float
    steps_done: int
    steps_total: int
    sigma_floor: float
    sigma_reference: float
    sigma_current: float


@dataclass(frozen=True)
class ValidationStats:
    """Loss on PUBLIC (or non-private held-out) validation data: free to observe.

    Attributes:
        loss: mean validation loss now.
        previous_loss: validation loss at the previous controller decision (``initial_loss`` at the first).
        initial_loss: validation loss before the first private step (the normalizer).
    """

    loss: float
    previous_loss: float
    initial_loss: float

    def __post_init__(self) -> None:
        for name in ("loss", "previous_loss", "initial_loss"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"ValidationStats.{name}: expected a finite Python float, got {v!r}")
        if self.initial_loss <= 0:
            raise ValueError(f"ValidationStats.initial_loss must be > 0, got {self.initial_loss}")

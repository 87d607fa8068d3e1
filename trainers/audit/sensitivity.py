"""Sensitivity audit: does one added user move every released quantity by at most what the ledger assumed?

The accountant's sigma_eff presumes a sensitivity for each thing a DP step releases: each group's clipped gradient
sum moves by at most C_k, each (centred) clip count by at most 1/2, so the whole release moves by at most
1/sigma_eff in units of its noise. This audit measures it: release a batch and the same batch with one more user
under the SAME noise key and step (the noise cancels in the difference), and compare each shift with its bound.
Unlike a statistical audit it needs no canaries or repetitions, and a release accounted at half its sensitivity
(raw clip counts accounted as centred ones, ``PlantedBug.RAW_CLIP_COUNTS``) fails it deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trainers.engine.engine import DPEngine, UserBatch
from trainers.engine.policy import StepPlan


@dataclass(frozen=True)
class SensitivityResult:
    """Shifts of one release when one user is added.

    Attributes:
        grad_shift: per group, ||delta of the released gradient sum|| / C_k (at most 1 when sound).
        count_shift: per group, |delta of the released clip count| (at most 1/2 when sound); () without counts.
        release_shift: the whole release's shift in noise units, times sigma_eff (at most 1 when sound).
        sigma_eff: the multiplier the engine recorded on the ledger event.
    """

    grad_shift: tuple[float, ...]
    count_shift: tuple[float, ...]
    release_shift: float
    sigma_eff: float

    def violations(self, *, rel_tol: float = 1e-4) -> list[str]:
        """What exceeds its accounted sensitivity (empty when the release is sound)."""
        out = [f"group {k}: gradient moved {r:.4g} x C_k" for k, r in enumerate(self.grad_shift) if r > 1 + rel_tol]
        out += [f"group {k}: clip count moved {c:.4g} > 1/2" for k, c in enumerate(self.count_shift)
                if c > 0.5 * (1 + rel_tol)]
        if self.release_shift > 1 + rel_tol:
            out.append(f"the release moved {self.release_shift:.4g} / sigma_eff in noise units (accounted: 1)")
        return out


class _FixedPlan:
    """Plans ``plan`` at every step: the policy's own plan, released by the engine under audit."""

    def __init__(self, plan: StepPlan) -> None:
        self._plan = plan

    def plan(self, step: int, groups: Any) -> StepPlan:
        return self._plan

    def observe(self, released: Any) -> None:
        return None


def add_one_user_shift(
    make_model: Callable[[], torch.nn.Module],
    plan: StepPlan,
    batch: UserBatch,
    extra: UserBatch,
    loss_fn: Callable[[torch.nn.Module], Callable[[Any], torch.Tensor]],
    *,
    engine_factory: Callable[..., DPEngine] = DPEngine,
    num_users: int = 100,
    sampling_rate: float = 0.5,
    seed: int = 0,
) -> SensitivityResult:
    """Release ``batch`` and ``batch`` + ``extra`` (one user's records) with the same plan, key and step.

    Args:
        make_model: a fresh model with its adapters (called twice; must give identical weights).
        plan: the clip/noise plan to release with (e.g. a real policy's ``plan(0, groups)``).
        loss_fn: ``loss_fn(model)`` is the per-record loss of that model.
        engine_factory: ``DPEngine`` or a planted-bug variant.
        seed: the (test-only, public) key shared by both releases, so the noise cancels.
    """
    outs = []
    for records in (batch, _concat(batch, extra)):
        model = make_model()
        grads: list[list[torch.Tensor]] = []
        engine = engine_factory(model, stage="audit", sampling_rate=sampling_rate, num_users=num_users, seed=seed,
                                policy=_FixedPlan(plan), event_sink=lambda e: None, check_weights_move=False,
                                check_record_independence=False)
        engine.apply_fn = lambda gs, out=grads: out.append([g.detach().double().clone() for g in gs])
        result = engine.step(records, loss_fn(model))
        engine.close()
        b = engine.expected_batch_size
        outs.append(([g * b for g in grads[0]], result.released.noisy_unclipped_counts, result.event, engine))
    (a, ca, event, engine), (b_, cb, _, _) = outs
    grad_shift, total = [], 0.0
    for k, members in enumerate(engine.group_members):
        moved = math.sqrt(sum(float((b_[i] - a[i]).pow(2).sum()) for i in members))
        grad_shift.append(moved / plan.clip_norms[k])
        total += (moved / plan.noise_stds[k]) ** 2
    count_shift: list[float] = []
    if plan.count_noise_std is not None and ca is not None and cb is not None:
        for x, y in zip(ca, cb, strict=True):
            count_shift.append(abs(y - x))
            total += ((y - x) / plan.count_noise_std) ** 2
    sigma_eff = float(event.noise_multiplier)
    return SensitivityResult(tuple(grad_shift), tuple(count_shift), math.sqrt(total) * sigma_eff, sigma_eff)


def _concat(batch: UserBatch, extra: UserBatch) -> UserBatch:
    if set(extra.user_ids.tolist()) & set(batch.user_ids.tolist()):
        raise ValueError("the extra user must not already be in the batch")
    return UserBatch(
        records={k: torch.cat([batch.records[k], extra.records[k]]) for k in batch.records},
        user_ids=torch.cat([batch.user_ids, extra.user_ids]),
    )

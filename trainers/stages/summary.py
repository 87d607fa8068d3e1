"""What every stage recipe returns and the report reads: a typed, immutable :class:`StageSummary`.

One name for each quantity every stage has -- ``status``/``reason``, ``steps`` done (PPO: iterations) and
``planned_steps``, ``noise_multiplier`` (the stage's calibrated sigma_eff, from its plan), ``epsilon`` spent (from
the ledger), ``wall_time_s`` (None when it may not be published) -- and the recipe's own plain data in
``details`` (histories, rollout sync statistics, losses on public data). It reads like a mapping (``s["steps"]``),
so the run directory's JSON and existing readers see one flat dictionary.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

STATUSES = ("completed", "refused")


@dataclass(frozen=True)
class StageSummary(Mapping[str, Any]):
    """A finished (or refused) stage, as plain data.

    Attributes:
        stage: "sft", "rm" or "ppo"; private: whether it ran the DP engine.
        status: "completed", or "refused" (the privacy filter refused a step; ``reason`` says which and why).
        steps: steps taken (PPO: iterations); planned_steps: the plan's T.
        noise_multiplier: sigma_eff the stage was calibrated to (None when not private).
        epsilon: epsilon the stage spent (public: from the ledger; None when not private).
        wall_time_s: the stage's wall time, or None where it may not be published (a private stage without
            ``run.report_wall_time``: it follows the private batch sizes).
        mechanism: the engine's mechanism summary (gradient and count noise, groups), or None.
        details: the recipe's own plain data; its keys may not shadow the fields above.
    """

    stage: str
    private: bool
    status: str
    reason: str
    steps: int
    planned_steps: int
    noise_multiplier: float | None = None
    epsilon: float | None = None
    wall_time_s: float | None = None
    mechanism: Mapping[str, Any] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status={self.status!r}: must be one of {STATUSES}")
        clash = sorted(set(self.details) & {f.name for f in fields(self)})
        if clash:
            raise ValueError(f"stage {self.stage!r}: details may not shadow the summary's fields {clash}")
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    def to_dict(self) -> dict[str, Any]:
        """One flat, JSON-ready dictionary (the done marker's ``summary``; ``summary.json``)."""
        common = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        common["mechanism"] = dict(self.mechanism) if self.mechanism is not None else None
        return {**dict(self.details), **common}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageSummary:
        """The inverse of :meth:`to_dict` (a resumed run reads finished stages back from their markers)."""
        names = {f.name for f in fields(cls)} - {"details"}
        return cls(**{k: data[k] for k in names if k in data},
                   details={k: v for k, v in data.items() if k not in names})

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def summarize(
    ctx: Any, result: Mapping[str, Any], *, steps: int, planned_steps: int, noise_multiplier: float | None,
    wall_time_s: float | None, **details: Any,
) -> StageSummary:
    """A recipe's summary from its learner's result (status, reason, mechanism; every other key becomes a detail)
    and what the driver knows (the plan's T and sigma, epsilon from the ledger, the publishable wall time)."""
    common = {"status", "reason", "steps", "mechanism"}
    epsilon = float(ctx.ledger.epsilon(ctx.stage)) if ctx.private and ctx.ledger is not None else None
    return StageSummary(
        stage=ctx.stage, private=ctx.private, status=result["status"], reason=result["reason"], steps=int(steps),
        planned_steps=int(planned_steps), noise_multiplier=noise_multiplier, epsilon=epsilon,
        wall_time_s=wall_time_s, mechanism=result.get("mechanism"),
        details={**{k: v for k, v in result.items() if k not in common}, **details},
    )

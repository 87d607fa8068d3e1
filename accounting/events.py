"""Privacy events: immutable records of every noisy release, convertible to dp-accounting DpEvents.

A release in dpalign is always a Poisson-subsampled Gaussian mechanism: users are sampled with rate q, their
clipped contributions summed, and Gaussian noise with effective multiplier sigma_eff (noise std over L2
sensitivity) added. When the same sample is released K times (K PPO epochs over one batch), the inner mechanism
is the K-fold composition of Gaussians, which is exactly one Gaussian with multiplier sigma_eff / sqrt(K); the
event is still ONE Poisson-sampled event, never K fresh ones (docs/design.md section 2, "Reuse of a sample").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

PURPOSES = ("gradient", "clip_count", "metric", "tuning", "other")


@dataclass(frozen=True)
class PrivacyEvent:
    """One Poisson-sampled Gaussian release (possibly repeated on the same sample).

    Mechanism: sample each user independently with probability ``sampling_rate``; release
    ``sum_u clip(f(u)) + N(0, (noise_multiplier * Delta)^2 I)`` ``repeats`` times on that same sample, with fresh
    noise each time, where Delta is the L2 sensitivity (the clip norm).

    Attributes:
        stage: pipeline stage that made the release ("sft", "rm", "ppo", or a custom name).
        step: step index within the stage (0-based); identifies the release for audits and resume.
        purpose: what was released (one of PURPOSES).
        sampling_rate: Poisson sampling rate q in (0, 1].
        noise_multiplier: effective multiplier sigma_eff > 0 of ONE release (see
            ``accounting.mechanisms.effective_noise_multiplier``).
        repeats: K >= 1 releases of the same sample (PPO epochs).
    """

    stage: str
    step: int
    purpose: str
    sampling_rate: float
    noise_multiplier: float
    repeats: int = 1

    def __post_init__(self) -> None:
        if not (0.0 < self.sampling_rate <= 1.0):
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if not (self.noise_multiplier > 0.0) or math.isinf(self.noise_multiplier):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier}")
        if int(self.repeats) != self.repeats or self.repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {self.repeats}")
        if self.step < 0:
            raise ValueError(f"step must be >= 0, got {self.step}")
        if self.purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}, got {self.purpose!r}")

    @property
    def composed_noise_multiplier(self) -> float:
        """Multiplier of the single Gaussian equivalent to ``repeats`` releases: sigma_eff / sqrt(K)."""
        return self.noise_multiplier / math.sqrt(self.repeats)

    def to_dp_event(self) -> Any:
        """The dp-accounting event: PoissonSampled(q, Gaussian(sigma_eff / sqrt(K)))."""
        import dp_accounting

        inner = dp_accounting.GaussianDpEvent(self.composed_noise_multiplier)
        if self.sampling_rate >= 1.0:
            return inner
        return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, inner)

    def same_mechanism(self, other: PrivacyEvent) -> bool:
        """True when two events cost the same (used to coalesce runs of identical events)."""
        return (
            self.sampling_rate == other.sampling_rate
            and self.composed_noise_multiplier == other.composed_noise_multiplier
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyEvent:
        """Rebuild an event from a ledger line (extra keys such as "type" or "time" are ignored).

        Numbers are checked for type here because JSON is untyped: a step of 1.5 or a rate of "0.01" is refused.
        """
        for key in ("step", "repeats"):
            if key in data and (isinstance(data[key], bool) or not isinstance(data[key], int)):
                raise ValueError(f"{key} must be an integer, got {data[key]!r}")
        for key in ("sampling_rate", "noise_multiplier"):
            if isinstance(data.get(key), bool) or not isinstance(data.get(key), (int, float)):
                raise ValueError(f"{key} must be a number, got {data.get(key)!r}")
        return cls(
            stage=str(data["stage"]),
            step=data["step"],
            purpose=str(data["purpose"]),
            sampling_rate=float(data["sampling_rate"]),
            noise_multiplier=float(data["noise_multiplier"]),
            repeats=data.get("repeats", 1),
        )

"""White-box gradient-canary one-run audit of the DP engine (Steinke, Nasr & Jagielski 2023, section 6).

What is audited: the REAL ``trainers.engine.DPEngine`` release path -- Poisson sampler, per-user gradient hooks,
per-group clipping, noise from the (seed, step, release) generator, normalization by the public B = q * N, and the
PrivacyEvents it emits -- against the epsilon the accountant computes from those events. Nothing of the mechanism
is re-implemented here; only the inputs (canary gradients) and the observation (the released update) are chosen.

Canaries. ``num_canaries`` = m canary users, each in the private data iff a fair coin says so
(``accounting.audit.one_run.draw_inclusion``), plus ``num_ordinary_users`` ordinary users. To make a user's
gradient exactly a chosen direction through the engine's own per-user gradient path, the model is a stack of K
bias-free ``nn.Linear`` layers (one clipping group each, ``grouping="module"``) and a record's loss is
``sum_k a_k . (W_k x_k)``, whose gradient with respect to W_k is the outer product a_k x_k^T, independent of W.
Canary i's gradient in group k is ``canary_norm_factor * C`` at the single weight entry number i (a Dirac canary,
the same entry in every group): its norm in every group exceeds C, so clipping is active and the clipped
contribution has norm C * sqrt(K) = ||C||_2 -- the worst case the noise is calibrated to, which makes the audit
tight. Canaries are orthogonal to each other, so their scores are independent given the sample. Ordinary users
have random rank-one gradients of norm about C in every group, which spill onto canary entries like real users do.

Observation and score. The auditor sees every released update (``apply_fn``; the white-box threat model of
DP-SGD: all intermediate models are public). For release j of step t it reads canary i's entries and forms

    z_{t,j,i} = B * sum_k release_{t,j,k}[i] / (sigma * C * K)     ~ N(1/sigma, 1) if sampled, N(0, 1) if not,

for the CORRECT engine with the configured sigma (isotropic noise sigma * ||C||_2 per group). Over the R releases
of one sample, zbar = sum_j z_j / sqrt(R) ~ N(mu * 1[sampled], 1) with mu = sqrt(R) / sigma, and the canary's
score is the log-likelihood ratio of "in the data" (Poisson-sampled with rate q each step) against "absent":

    score_i = sum_t log(1 - q + q * exp(mu * zbar_{t,i} - mu^2 / 2)).

The score uses only public configuration (q, sigma, C, K, R), fixed before the run. The guesses are the top/bottom
scores over a grid of (k_+, k_-) fixed in advance with a Bonferroni correction (``audit_scores_best_of``).

Claimed epsilon: the PLD accountant over exactly the PrivacyEvents the engine emitted, at ``delta``. The audit
flags when eps_lb > claimed eps; for a correct engine this happens with probability at most 1 - confidence.

Power, honestly: the one-run audit is nearly tight for the Gaussian mechanism without subsampling (q = 1) when
eps is small, and weak under Poisson subsampling (an included canary that was not sampled looks excluded). With
m = 1000 canaries it certifies up to about eps_lb ~ 4-5; larger claims cannot be refuted, whatever the bug.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from accounting.accountants import EpsilonResult, coalesce, epsilon
from accounting.audit.one_run import OneRunResult, audit_scores_best_of, draw_inclusion
from accounting.events import PrivacyEvent
from dpalign.config import require


@dataclass(frozen=True)
class WhiteboxAuditConfig:
    """One white-box audit: canaries, the DP schedule under audit, and the statistics."""

    num_canaries: int = 1000
    """m, canaries, each included with probability 1/2. More canaries, more power (and memory: m entries per
    group per sampled user)."""
    num_ordinary_users: int = 200
    """Users that are always in the data (their gradients are the 'training signal' the canaries hide in)."""
    num_groups: int = 4
    """K, clipping groups (one nn.Linear each); the sqrt(K) trap needs K > 1."""
    steps: int = 1
    """T, logical steps (new Poisson samples)."""
    repeats: int = 1
    """R, releases of each sample (PPO epochs); the engine emits ONE event with repeats=R per step."""
    sampling_rate: float = 1.0
    """Poisson rate q. q = 1 gives the tightest audit (no amplification to hide behind)."""
    noise_multiplier: float = 4.0
    """sigma of the FixedPolicy under audit (isotropic noise sigma * C * sqrt(K) per group)."""
    clip_norm: float = 1.0
    """C, the per-group clipping threshold."""
    canary_norm_factor: float = 8.0
    """Each canary's group gradient has norm canary_norm_factor * C: > 1 so clipping is exercised (and a
    clipping bug shows up as a factor-times stronger canary)."""
    delta: float = 1e-6
    """delta of the claim and of the audit's null hypothesis."""
    confidence: float = 0.95
    """1 - beta: the audit's bound holds with this probability for a correct engine."""
    seed: int = 0
    """Seeds the coins, the ordinary users, the sampler and the engine's noise streams."""

    def check(self) -> None:
        """Range checks (run by the config loader and by :func:`run_whitebox_audit`)."""
        for name in ("num_canaries", "num_groups", "steps", "repeats"):
            require(getattr(self, name) >= 1, name, f"{getattr(self, name)}: must be >= 1")
        require(self.num_ordinary_users >= 0, "num_ordinary_users", "must be >= 0")
        require(0.0 < self.sampling_rate <= 1.0, "sampling_rate", f"{self.sampling_rate}: must be in (0, 1]")
        require(
            0.0 < self.noise_multiplier < math.inf,
            "noise_multiplier",
            f"{self.noise_multiplier}: must be finite, > 0",
        )
        require(0.0 < self.clip_norm < math.inf, "clip_norm", f"{self.clip_norm}: must be finite and > 0")
        require(
            self.canary_norm_factor >= 1.0,
            "canary_norm_factor",
            f"{self.canary_norm_factor}: must be >= 1 (a canary below the threshold is not the worst case and makes "
            "the audit loose)",
        )
        require(0.0 < self.delta < 1.0, "delta", f"{self.delta}: must be in (0, 1)")
        require(0.0 < self.confidence < 1.0, "confidence", f"{self.confidence}: must be in (0, 1)")

    @property
    def num_users(self) -> int:
        """Public user slots N: ordinary users then canaries (an excluded canary is a slot with no records)."""
        return self.num_ordinary_users + self.num_canaries

    @property
    def layer_shape(self) -> tuple[int, int]:
        """(out, in) of each group's weight: at least m entries, one per canary, plus room for ordinary users."""
        n_in = max(8, math.ceil(math.sqrt(self.num_canaries)))
        n_out = math.ceil((self.num_canaries + 1) / n_in)
        return n_out, n_in


@dataclass(frozen=True)
class WhiteboxAuditResult:
    """The audit's verdict and everything behind it.

    Attributes:
        claimed: the accountant's epsilon over the events the engine emitted.
        audit: the one-run result (eps_lb, counts, guesses).
        flagged: eps_lb > claimed epsilon.
        num_events: PrivacyEvents the engine emitted.
        seconds: wall time of the engine steps and the statistics.
        scores: [m] the canary scores (for plots; not serialized).
        included: [m] bool, the canary coins (for plots; not serialized).
    """

    claimed: EpsilonResult
    audit: OneRunResult
    flagged: bool
    num_events: int
    seconds: float
    scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    included: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def verdict(self) -> str:
        """One line: what the numbers mean."""
        eps_lb, eps = self.audit.epsilon_lb, self.claimed.epsilon
        conf = f"{100 * self.audit.confidence:g}%"
        if self.flagged:
            return (
                f"FLAGGED: eps_lb={eps_lb:.3f} > claimed eps={eps:.3f} at {conf} confidence: the mechanism or its "
                "accounting is broken"
            )
        return (
            f"consistent: eps_lb={eps_lb:.3f} <= claimed eps={eps:.3f} ({conf} confidence); a lower bound below the "
            "claim is consistent with the guarantee, not a proof of it"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "claimed": self.claimed.to_dict(),
            "audit": self.audit.to_dict(),
            "flagged": self.flagged,
            "num_events": self.num_events,
            "seconds": self.seconds,
            "verdict": self.verdict,
        }


class CanaryModel(nn.Module):
    """K bias-free linear layers ``g{k}``; ``forward(x, a)`` is the per-record loss sum_k a_k . (W_k x_k).

    Its per-record gradient with respect to W_k is a_k x_k^T: any rank-one gradient can be planted exactly,
    through the engine's own Linear per-record rule.
    """

    def __init__(self, num_groups: int, n_out: int, n_in: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out, bias=False) for _ in range(num_groups))
        for layer in self.layers:
            nn.init.zeros_(layer.weight)

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        # x: [R, K, in], a: [R, K, out] -> loss [R]
        return sum((layer(x[:, k]) * a[:, k]).sum(-1) for k, layer in enumerate(self.layers))  # type: ignore[return-value]


@dataclass(frozen=True)
class CanaryData:
    """The planted population: per user slot, the rank-one factors of its gradient in every group.

    Attributes:
        included: [m] bool, the coins (True: canary i is in the private data).
        x: [N, K, in] float32 right factors (zero rows for excluded canaries; never used for them).
        a: [N, K, out] float32 left factors.
        present: [N] bool, user slot has records (ordinary users and included canaries).
        canary_entries: [m] int64, the flat weight entry (same in every group) of canary i.
    """

    included: np.ndarray
    x: Tensor
    a: Tensor
    present: Tensor
    canary_entries: Tensor


def plant_canaries(config: WhiteboxAuditConfig) -> CanaryData:
    """Draw the coins and build every user's gradient factors (seeded by ``config.seed``)."""
    m, n_ord, k = config.num_canaries, config.num_ordinary_users, config.num_groups
    n_out, n_in = config.layer_shape
    included = draw_inclusion(m, seed=config.seed)  # [m]
    gen = torch.Generator().manual_seed(config.seed + 1)
    x = torch.zeros(n_ord + m, k, n_in)
    a = torch.zeros(n_ord + m, k, n_out)
    if n_ord:
        # Ordinary users: random rank-one gradients with group norms spread around C (some clipped, some not).
        xo = torch.randn(n_ord, k, n_in, generator=gen)
        ao = torch.randn(n_ord, k, n_out, generator=gen)
        scale = config.clip_norm * (0.5 + 1.5 * torch.rand(n_ord, k, 1, generator=gen))  # [n_ord, K, 1]
        x[:n_ord] = xo / xo.norm(dim=-1, keepdim=True) * scale
        a[:n_ord] = ao / ao.norm(dim=-1, keepdim=True)
    entries = torch.arange(m)  # canary i owns flat entry i of every group's [out, in] weight
    rows, cols = entries // n_in, entries % n_in
    idx = torch.arange(m) + n_ord
    x[idx[:, None], torch.arange(k)[None, :], cols[:, None]] = config.canary_norm_factor * config.clip_norm
    a[idx[:, None], torch.arange(k)[None, :], rows[:, None]] = 1.0
    present = torch.ones(n_ord + m, dtype=torch.bool)
    present[n_ord:] = torch.from_numpy(included)
    return CanaryData(included=included, x=x, a=a, present=present, canary_entries=entries)


EngineFactory = Callable[..., Any]
"""Builds the engine under audit with ``DPEngine``'s keyword arguments (tests pass a planted-bug engine)."""
SamplerFactory = Callable[..., Any]
"""Builds the user sampler with ``PoissonUserSampler``'s arguments; it must have ``sample(step) -> Tensor``."""


def canary_scores(observed: Tensor, *, config: WhiteboxAuditConfig, expected_batch_size: float) -> np.ndarray:
    """Log-likelihood-ratio scores (see the module docstring) from the released canary entries.

    Args:
        observed: [T, R, K, m] the released update at each canary's entry, per step, release and group.
    """
    t, r, k, m = observed.shape
    sigma, c, q = config.noise_multiplier, config.clip_norm, config.sampling_rate
    z = observed.double() * expected_batch_size / (sigma * c * k)  # [T, R, K, m] -> summed over K below
    zbar = z.sum(dim=2).sum(dim=1) / math.sqrt(r)  # [T, m]
    mu = math.sqrt(r) / sigma
    llr = mu * zbar - mu * mu / 2.0  # [T, m] log-likelihood ratio of a sampled vs an absent canary
    if q < 1.0:
        llr = torch.logaddexp(torch.full_like(llr, math.log1p(-q)), llr + math.log(q))
    return llr.sum(dim=0).numpy()  # [m]


def run_whitebox_audit(
    config: WhiteboxAuditConfig,
    *,
    engine_factory: EngineFactory | None = None,
    sampler_factory: SamplerFactory | None = None,
    candidates: Sequence[tuple[int, int]] | None = None,
) -> WhiteboxAuditResult:
    """Plant canaries, run ``config.steps`` x ``config.repeats`` releases of the engine, audit, compare to the
    claim. ``engine_factory`` / ``sampler_factory`` default to the real ``DPEngine`` / ``PoissonUserSampler``.
    """
    import time

    from trainers.engine import DPEngine, FixedPolicy, PoissonUserSampler, UserBatch

    config.check()
    start = time.perf_counter()
    data = plant_canaries(config)
    n_out, n_in = config.layer_shape
    model = CanaryModel(config.num_groups, n_out, n_in)
    events: list[PrivacyEvent] = []
    current: list[list[Tensor]] = []  # released canary entries of the current step, one [K, m] per release
    entries = data.canary_entries

    def observe_and_apply(grads: Sequence[Tensor]) -> None:
        # grads: per trainable tensor (one [out, in] weight per group, module order): the released update.
        current.append(torch.stack([g.reshape(-1)[entries] for g in grads]))  # [K, m]
        with torch.no_grad():
            for (_, p), g in zip(model.named_parameters(), grads, strict=True):
                p -= (
                    0.1 * g
                )  # the update is applied, as in training (the loss is linear: gradients do not move)

    engine = (engine_factory or DPEngine)(
        model,
        stage="audit",
        sampling_rate=config.sampling_rate,
        num_users=config.num_users,
        seed=config.seed,
        policy=FixedPolicy(noise_multiplier=config.noise_multiplier, clip_norm=config.clip_norm),
        event_sink=events.append,
        grouping="module",
        apply_fn=observe_and_apply,
    )
    sampler = (sampler_factory or PoissonUserSampler)(
        config.num_users, sampling_rate=config.sampling_rate, seed=config.seed
    )

    def loss_fn(records: dict[str, Tensor]) -> Tensor:
        return model(records["x"], records["a"])  # [R]

    observed = []
    try:
        for step in range(config.steps):
            sampled = sampler.sample(step)  # [n] user slots
            users = sampled[data.present[sampled]]  # excluded canaries have no records
            batch = UserBatch(records={"x": data.x[users], "a": data.a[users]}, user_ids=users)
            current.clear()
            for release in range(config.repeats):
                engine.step(batch, loss_fn, repeats=config.repeats, release=release)
            observed.append(torch.stack(current))  # [R, K, m]
    finally:
        engine.close()
    scores = canary_scores(
        torch.stack(observed), config=config, expected_batch_size=config.sampling_rate * config.num_users
    )  # [m]
    audit = audit_scores_best_of(
        scores, data.included, candidates=candidates, delta=config.delta, confidence=config.confidence
    )
    claimed = epsilon(coalesce(events), delta=config.delta, accountant="pld")
    return WhiteboxAuditResult(
        claimed=claimed,
        audit=audit,
        flagged=audit.flags(claimed.epsilon),
        num_events=len(events),
        seconds=time.perf_counter() - start,
        scores=scores,
        included=data.included,
    )

"""Small components shared by the three stage recipes: users, noise calibration, policies, the engine, the loop.

A recipe (``trainers.stages.sft``, ``.rm``, ``.ppo``) is a plain function over these pieces; there is no base
Trainer. What every private stage does is the same five lines:

    users = UserIndex.from_ids(rows["user_id"])              # the privacy unit
    sigma = calibrate_stage(ctx, q=q, steps=T, repeats=K)    # before any step, from the public schedule
    policy = make_policy(ctx.cfg.engine, sigma=sigma, ...)    # fixed / per-layer / adaptive / learned
    engine = build_engine(ctx, model, q=q, users=users, policy=policy, optimizer=opt)   # ledger sink + filter
    for step in range(T): engine.step(batch_of(sampler.sample(step)), loss_fn); opt.step()

Everything the loop logs is public or released: epsilon spent and sigma_eff (ledger), the norm of the released
noisy gradient (post-processing), and losses on PUBLIC held-out data. The training loss of a private stage is a
statistic of private data and never reaches a log or a progress bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from accounting.accountants import schedule_epsilon
from accounting.calibration import calibrate_noise_multiplier
from accounting.composition import user_set_fingerprint

ENGINE_GROUPING = {"per_module": "module", "per_tensor": "per_tensor", "flat": "flat"}


class StageRefused(RuntimeError):
    """The privacy filter refused a step: the stage stopped cleanly, and the report says why."""


@dataclass
class StageContext:
    """What a stage recipe needs from the pipeline (built by ``launch.pipeline.pipeline``).

    Attributes:
        stage: "sft", "rm" or "ppo".
        cfg: the root RunConfig.
        private: whether this stage runs the DP engine under the preset.
        ledger: the run's write-ahead ledger (required when private).
        metrics: the run's MetricsLogger (or None in unit tests).
        target_epsilon, target_delta: this stage's budget (None when not private).
        seed: seed of this stage's sampling, noise and initialization.
        progress: show progress bars.
        num_threads: torch threads for this process.
    """

    stage: str
    cfg: Any
    private: bool
    ledger: Any = None
    metrics: Any = None
    target_epsilon: float | None = None
    target_delta: float | None = None
    seed: int = 0
    progress: bool = True
    policy_factory: Callable[..., Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def log(self, key: str, value: float, *, step: int, private: bool = False, released: bool = False) -> None:
        """Log a scalar; a value derived from private data must be released (noised and accounted)."""
        if self.metrics is not None:
            self.metrics.log(key, float(value), step=step, stage=self.stage, private=private, released=released)


@dataclass(frozen=True)
class UserIndex:
    """Records grouped by user: the privacy unit of a stage.

    Attributes:
        user_keys: the distinct user ids, sorted (index u is user ``user_keys[u]``).
        record_user: [R] int64, the user index of every record.
    """

    user_keys: tuple[str, ...]
    record_user: Tensor

    @staticmethod
    def from_ids(user_ids: Sequence[str]) -> UserIndex:
        keys = tuple(sorted(set(user_ids)))
        where = {k: i for i, k in enumerate(keys)}
        return UserIndex(keys, torch.tensor([where[u] for u in user_ids], dtype=torch.int64))

    @property
    def num_users(self) -> int:
        return len(self.user_keys)

    @property
    def fingerprint(self) -> str:
        return user_set_fingerprint(self.user_keys)

    def records_of(self, users: Tensor) -> Tensor:
        """Record indices [R'] (ascending) of the sampled ``users`` [n]: every record of each sampled user."""
        if users.numel() == 0:
            return torch.zeros(0, dtype=torch.int64)
        mask = torch.isin(self.record_user, users)
        return torch.nonzero(mask).flatten()


def calibrate_stage(ctx: StageContext, *, q: float, steps: int, repeats: int = 1) -> float:
    """sigma_eff for this stage's public schedule so that its epsilon is at most the stage target.

    Under the RDP privacy filter the calibration is made at the run's fixed order (the filter's), so every
    planned step is admitted; under PLD it is dp-accounting's PLD. Never overshoots.
    """
    if ctx.target_epsilon is None or ctx.target_delta is None:
        raise ValueError(f"stage {ctx.stage!r} is private but has no target (epsilon, delta)")
    ledger = ctx.ledger
    accountant = ledger.run.accountant if ledger is not None else ctx.cfg.privacy.accountant
    if accountant == "rdp" and ledger is not None:
        order = ledger.run.rdp_order
        return _calibrate_at_order(
            target=ctx.target_epsilon, delta=ctx.target_delta, q=q, steps=steps, repeats=repeats, order=order
        )
    cal = calibrate_noise_multiplier(
        target_epsilon=ctx.target_epsilon,
        delta=ctx.target_delta,
        sampling_rate=q,
        steps=steps,
        repeats=repeats,
        accountant=accountant,
    )
    return cal.noise_multiplier


def _calibrate_at_order(*, target: float, delta: float, q: float, steps: int, repeats: int, order: float) -> float:
    def eps(sigma: float) -> float:
        return schedule_epsilon(
            noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=delta, repeats=repeats,
            accountant="rdp", rdp_order=order,
        ).epsilon

    lo, hi = 0.05, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier <= 1e4 reaches epsilon {target} at RDP order {order}")
    for _ in range(60):
        mid = (lo + hi) / 2
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4 * hi:
            break
    assert eps(hi) <= target
    return hi


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


def make_policy(
    ctx: StageContext, *, sigma: float, groups: Sequence[Any], expected_batch_size: float, **plan: Any
) -> Any:
    """The stage's clip/noise policy: the learned controller when ``controller.enabled`` (or an explicit
    ``ctx.policy_factory``), else fixed / per-layer / adaptive from the ``engine`` config.

    ``plan`` carries the public schedule the controller needs (``steps``, ``sampling_rate``, ``repeats``) and a
    ``validation_loss`` callable on PUBLIC data.
    """
    from trainers.engine.policy import AdaptiveClippingPolicy, FixedPolicy, PerLayerFixedPolicy

    eng = ctx.cfg.engine
    factory = ctx.policy_factory
    controller_cfg = getattr(ctx.cfg, "controller", None)
    if factory is None and controller_cfg is not None and controller_cfg.enabled:
        from controller.policy import controller_policy_factory

        factory = controller_policy_factory(controller_cfg)
    if factory is not None:
        return factory(ctx=ctx, sigma=sigma, groups=groups, expected_batch_size=expected_batch_size,
                       **{k: v for k, v in plan.items() if v is not None})
    norms = group_thresholds(eng, groups)
    if eng.policy == "fixed":
        return FixedPolicy(noise_multiplier=sigma, clip_norm=norms[0])
    if eng.policy == "per_layer":
        return PerLayerFixedPolicy(noise_multiplier=sigma, clip_norms=norms)
    count_std = eng.count_noise_std if eng.count_noise_std is not None else expected_batch_size / 20.0
    return AdaptiveClippingPolicy(
        noise_multiplier=sigma,
        initial_clip_norm=norms[0],
        count_noise_std=count_std,
        target_quantile=eng.adaptive_quantile,
        learning_rate=eng.adaptive_lr,
    )


def build_engine(
    ctx: StageContext,
    model: torch.nn.Module,
    *,
    q: float,
    users: UserIndex,
    optimizer: torch.optim.Optimizer,
    sigma: float | None,
    start_step: int = 0,
    steps: int | None = None,
    repeats: int = 1,
    validation_loss: Callable[[], float] | None = None,
) -> Any:
    """The DP engine for this stage: ledger.record as the write-ahead sink, ledger.admit as the filter.

    Non-private stages use the same engine (same public normalization B = q * N) with no clipping, noise or
    events, so the baselines differ from the private runs only in the mechanism.
    """
    from trainers.engine.engine import DPEngine, clipping_groups, trainable_named_parameters

    grouping = ENGINE_GROUPING[ctx.cfg.engine.clipping]
    policy = None
    if ctx.private:
        if sigma is None or ctx.ledger is None:
            raise ValueError(f"stage {ctx.stage!r}: a private stage needs a calibrated sigma and the ledger")
        from trainers.engine.policy import GroupSpec

        params = trainable_named_parameters(model)
        specs = [
            GroupSpec(name=n, numel=sum(params[i][1].numel() for i in idx), param_names=tuple(params[i][0] for i in idx))
            for n, idx in clipping_groups(model, params, grouping)
        ]
        policy = make_policy(
            ctx, sigma=sigma, groups=specs, expected_batch_size=q * users.num_users,
            steps=steps, sampling_rate=q, repeats=repeats, validation_loss=validation_loss,
        )
        fingerprint = users.fingerprint
        ledger = ctx.ledger

        def sink(event: Any) -> None:
            ledger.record(event, stage_fingerprint=fingerprint)

        event_sink, admit = sink, ledger.admit
    else:
        event_sink, admit = None, None
    return DPEngine(
        model,
        stage=ctx.stage,
        sampling_rate=q,
        num_users=users.num_users,
        seed=ctx.seed,
        policy=policy,
        private=ctx.private,
        event_sink=event_sink,
        admit=admit,
        grouping=grouping,
        max_records_per_microbatch=ctx.cfg.engine.max_physical_batch_records,
        optimizer=optimizer,
        start_step=start_step,
    )


def spent_epsilon(ctx: StageContext) -> float:
    """Epsilon this stage has spent so far (public: computed from the ledger)."""
    if not ctx.private or ctx.ledger is None:
        return 0.0
    return float(ctx.ledger.epsilon(ctx.stage))


def progress_bar(ctx: StageContext, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not ctx.progress, dynamic_ncols=True, leave=True)


def public_lm_loss(model: torch.nn.Module, windows: Tensor, *, batch_size: int = 16) -> float:
    """Mean next-token loss of ``model`` on PUBLIC token windows [W, T] (free to log: no private data)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                ids = windows[i : i + batch_size]
                out = model(input_ids=ids, labels=ids)
                n = ids.numel() - ids.shape[0]
                total += float(out.loss) * n
                count += n
    finally:
        model.train(was)
    return total / max(count, 1)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


def save_json(path: Path, data: dict[str, Any]) -> None:
    import json

    path.write_text(json.dumps(data, indent=2, sort_keys=True))

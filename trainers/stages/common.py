"""Small components shared by the three stage recipes: users, noise calibration, policies, the engine, the loop.

A recipe (``trainers.stages.sft``, ``.rm``, ``.ppo``) is a plain function over these pieces; there is no base
Trainer. What every private stage does is the same five lines:

    users = UserIndex.from_ids(rows["user_id"])              # the privacy unit
    sigma = calibrate_stage(ctx, q=q, steps=T, repeats=K)    # before any step, from the public schedule
    noise = stage_noise_seed(ctx, learner)                   # secret, drawn by rank 0, shared with the ranks
    engine = build_engine(ctx, model, q=q, users=users, noise_seed=noise, ...)  # policy, ledger sink, filter
    sampler = PoissonUserSampler(N, sampling_rate=q, seed=noise)
    for step in range(T): engine.step(batch_of(sampler.sample(step)), loss_fn); opt.step()

Everything the loop logs is public or released: epsilon spent and sigma_eff (ledger), the norm of the released
noisy gradient (post-processing), and losses on PUBLIC held-out data. The training loss of a private stage is a
statistic of private data and never reaches a log or a progress bar.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from accounting.accountants import schedule_epsilon
from accounting.calibration import calibrate_noise_multiplier
from accounting.composition import user_set_fingerprint
from trainers.engine.sampling import NoiseSeed, describe_noise

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
        policy_factory: builds the clip/noise policy instead of the ``engine`` config (the learned controller).
        extras: recipe-specific inputs (e.g. "eval_prompts", "ray_storage").
        distributed: run the learner on ``ray.num_workers`` Ray Train workers (set by the pipeline when
            ``ray.num_workers >= 1``; Ray must be up). The ledger is handed to a sink actor for the stage and
            reopened into ``ctx.ledger`` afterwards, so callers must read ``ctx.ledger`` back after the stage.
        checkpoint_dir: where the in-process learner keeps this stage's latest mid-stage checkpoint (the pipeline
            passes RUN_DIR/checkpoints/<stage>, removed once the stage is committed); None: no checkpoints.
            The interval is ``cfg.run.checkpoint_every``.
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
    distributed: bool = False
    checkpoint_dir: Path | None = None

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


def reproducible_noise(cfg: Any) -> bool:
    """``run.reproducible_noise``: the noise keyed by the public stage seed (tests and debugging; NOT private)."""
    return bool(getattr(getattr(cfg, "run", None), "reproducible_noise", False))


def secure_rng(cfg: Any) -> bool:
    """``privacy.secure_rng``: noise and samples from the SHAKE-256 CSPRNG instead of torch's generator."""
    return bool(getattr(getattr(cfg, "privacy", None), "secure_rng", False))


NOT_PRIVATE_WARNING = (
    "NOT PRIVATE: run.reproducible_noise=true keys the DP noise and the Poisson samples by the public seed in "
    "config.yaml; anyone who knows it can regenerate the noise and subtract it from the released weights. For tests "
    "and debugging only"
)


def noise_disclosure(cfg: Any, *, private: bool = True) -> dict[str, Any]:
    """What the report and the stage summaries say about the noise: secret or reproducible, which generator, and
    the not-private warning of a reproducible run (never the seed itself). ``private=False``: a non-private
    stage (no noise, samples from the public seed, no claim to warn about)."""
    secure = secure_rng(cfg)
    if not private:
        return {"secret": False, "secure_rng": secure, "warning": None,
                "description": "non-private stage: no noise; Poisson samples from the public stage seed"}
    secret = not reproducible_noise(cfg)
    return {
        "secret": secret,
        "secure_rng": secure,
        "description": describe_noise(secret=secret, secure_rng=secure),
        "warning": None if secret else NOT_PRIVATE_WARNING,
    }


def released_timing(ctx: StageContext, t0: float) -> dict[str, float]:
    """``{"wall_time_s": ...}`` where the stage's wall time may be published, else {}.

    A private stage's time depends on its realized (private) batch sizes and is not accounted, so it is published
    only with ``run.report_wall_time`` (documented as an unaccounted release); a non-private stage's always."""
    import time

    run = getattr(ctx.cfg, "run", None)
    if ctx.private and not bool(getattr(run, "report_wall_time", False)):
        return {}
    return {"wall_time_s": time.time() - t0}


def stage_noise_seed(ctx: StageContext, learner: Learner) -> NoiseSeed:
    """The key of this stage execution's Poisson samples and noise (see ``trainers.engine.sampling``).

    By default a fresh 256-bit secret from OS entropy, drawn by rank 0 and broadcast to the other learner ranks
    over the job's own process group (private to the job), so every rank draws the same sample and adds the same
    noise once. It is never stored: not in the context (which Ray Train pickles into its storage), the config,
    the checkpoints or the report. A resumed or restarted stage draws a new one; the steps it takes are fresh,
    independent releases, as the ledger counts them. With ``run.reproducible_noise`` the public stage seed is the
    key instead (the old behaviour: bit-for-bit reruns, and no privacy against anyone who knows the seed). A
    non-private stage (a baseline, or a stage the preset treats as public) also uses the public stage seed: it
    adds no noise and claims nothing, and its runs stay reproducible.
    Collective when ``learner.world_size > 1``: every rank calls it at the same point.
    """
    secure = secure_rng(ctx.cfg)
    if reproducible_noise(ctx.cfg) or not ctx.private:  # a non-private stage claims nothing: reproducible
        return NoiseSeed.reproducible(ctx.seed, secure_rng=secure)
    seed = NoiseSeed.draw(secure_rng=secure) if learner.is_main_process else None
    if learner.world_size > 1:
        from trainers.distributed import broadcast_object, object_group

        seed = broadcast_object(seed, group=object_group())
    if not isinstance(seed, NoiseSeed):
        raise RuntimeError(f"stage {ctx.stage!r}: rank {learner.rank} received no noise seed from rank 0")
    return seed


def build_engine(
    ctx: StageContext,
    model: torch.nn.Module,
    *,
    q: float,
    users: UserIndex,
    noise_seed: NoiseSeed,
    optimizer: torch.optim.Optimizer,
    sigma: float | None,
    start_step: int = 0,
    steps: int | None = None,
    repeats: int = 1,
    validation_loss: Callable[[], float] | None = None,
    learner: Learner | None = None,
    apply_fn: Callable[[Sequence[Tensor]], None] | None = None,
) -> Any:
    """The DP engine for this stage: ledger.record as the write-ahead sink, ledger.admit as the filter, and the
    stage's ``noise_seed`` (:func:`stage_noise_seed`) as the key of its noise.

    Non-private stages use the same engine (same public normalization B = q * N) with no clipping, noise or
    events, so the baselines differ from the private runs only in the mechanism.

    With ``learner`` (a rank of a stage learner), its ``hooks`` replace the ledger: rank 0's event sink and
    filter (local ledger or the driver's sink actor), the all-reduce before noise, ``is_main_process``.
    ``apply_fn`` applies the final gradient (DeepSpeed's optimizer); None writes ``.grad`` for ``optimizer``.
    """
    from trainers.engine.engine import DPEngine, clipping_groups, trainable_named_parameters

    grouping = ENGINE_GROUPING[ctx.cfg.engine.clipping]
    policy = None
    if ctx.private:
        if sigma is None or (ctx.ledger is None and learner is None):
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
    hooks: dict[str, Any]
    if learner is not None:
        hooks = {k: v for k, v in learner.hooks.items() if ctx.private or k not in ("event_sink", "admit")}
    elif ctx.private:
        fingerprint = users.fingerprint
        ledger = ctx.ledger

        def sink(event: Any) -> None:
            ledger.record(event, stage_fingerprint=fingerprint)

        hooks = {"event_sink": sink, "admit": ledger.admit}
    else:
        hooks = {}
    return DPEngine(
        model,
        stage=ctx.stage,
        sampling_rate=q,
        num_users=users.num_users,
        seed=noise_seed,
        policy=policy,
        private=ctx.private,
        grouping=grouping,
        max_records_per_microbatch=ctx.cfg.engine.max_physical_batch_records,
        optimizer=optimizer,
        start_step=start_step,
        apply_fn=apply_fn,
        **hooks,
    )


def spent_epsilon(ctx: StageContext) -> float:
    """Epsilon this stage has spent so far (public: computed from the ledger)."""
    if not ctx.private or ctx.ledger is None:
        return 0.0
    return float(ctx.ledger.epsilon(ctx.stage))


PRIVATE_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
"""A private stage's progress bar: no rate, elapsed or remaining time (they follow the private batch sizes)."""


def progress_bar(ctx: StageContext, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    timed = not ctx.private or bool(getattr(getattr(ctx.cfg, "run", None), "report_wall_time", False))
    return tqdm(total=total, desc=desc, disable=not ctx.progress, dynamic_ncols=True, leave=True,
                bar_format=None if timed else PRIVATE_BAR_FORMAT)


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


# ----------------------------------------------------------------------------------------------------------------
# Where a stage's learner runs: this process, or Ray Train TorchTrainer workers (ray.num_workers >= 1)
#
# A learner stage (SFT, reward model) is split in two plain functions:
#   * a driver-side part (the recipe, ``run_sft``/``run_rm``): load the data, index the users, fix q and the
#     number of steps, calibrate sigma, ``ledger.begin_stage``; afterwards ``end_stage`` and the summary;
#   * a per-rank ``learn(ctx, plan, learner)``: rebuild the model from the stage's input directory, draw the SAME
#     Poisson sample on every rank, keep this rank's slice (``shard_users``), one engine step (clipped sums are
#     all-reduced before the noise, which every rank draws from the same (seed, step) stream), apply the update
#     (torch optimizer, or DeepSpeed's), and on rank 0 save the outputs into ``learner.output_dir``.
# In-process (the default) ``learn`` runs here with one rank and the ledger itself as the event sink, so results
# do not depend on the number of workers.


class LearnerMetrics:
    """A worker's stand-in for the driver's MetricsLogger: keeps rank 0's log calls, replayed on the driver.

    The provenance rule (private values only when released) is checked again by the real logger on replay.
    """

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows: list[dict[str, Any]] = list(rows or [])

    def log(self, key: str, value: float, *, step: int, stage: str, private: bool, released: bool = False) -> None:
        self.rows.append(
            {"key": key, "value": float(value), "step": int(step), "stage": stage, "private": private,
             "released": released}
        )


@dataclass
class Learner:
    """What a per-rank ``learn`` function needs to know about where it runs.

    Attributes:
        rank, world_size: this rank and the number of learner ranks (1 in-process).
        hooks: DPEngine keyword arguments: ``is_main_process``, and where needed ``reduce_fn`` (all-reduce of the
            clipped sums), ``event_sink`` / ``admit`` (rank 0: the ledger, local or through the sink actor).
        epsilon: epsilon spent so far by the stage (rank 0; public, from the ledger).
        output_dir: where rank 0 saves the stage's outputs (the stage directory, or a checkpoint directory).
        device: torch device of the model and records.
        deepspeed: the ``deepspeed`` config section when DeepSpeed applies the update, else None.
        restored: the last checkpoint's state (a Ray Train restart, or in-process a crashed run resumed from
            ``checkpoint_dir``), else None. ``restored["next_step"]`` is the step it was taken at.
        checkpoint_every: steps between mid-stage checkpoints (0: none).
        checkpoint_dir: the directory of the stage's latest checkpoint (``CHECKPOINT_FILE``, replaced atomically,
            written by rank 0; ``ctx.checkpoint_dir``, i.e. RUN_DIR/checkpoints/<stage>), in-process and on Ray
            Train workers alike, so a run resumed after a driver crash restarts from it; None: none kept there.
        checkpoint_meta: what the checkpoint must belong to (stage, user fingerprint, seed; see
            :func:`load_checkpoint`).
        ray_report: also report each checkpoint through ``ray.train.report`` (Ray Train workers with
            ``ray.max_failures != 0``: what a restarted worker group gets from ``ray.train.get_checkpoint``).
        recorded_steps: the ledger's count of this stage's steps when the learner started, read where the ledger
            is not in this process (a Ray worker asks the sink actor); None: :func:`resume_step` reads
            ``ctx.ledger``.
    """

    rank: int = 0
    world_size: int = 1
    hooks: dict[str, Any] = field(default_factory=dict)
    epsilon: Callable[[], float] = lambda: 0.0
    output_dir: Path | None = None
    device: str = "cpu"
    deepspeed: Any = None
    restored: dict[str, Any] | None = None
    checkpoint_every: int = 0
    recorder: LearnerMetrics | None = None
    checkpoint_dir: Path | None = None
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)
    recorded_steps: int | None = None
    ray_report: bool = False

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def checkpoint(self, state_fn: Callable[[], dict[str, Any]], *, step: int) -> None:
        """Mid-stage checkpoint every ``checkpoint_every`` steps: rank 0 replaces the one latest file in
        ``checkpoint_dir`` atomically, and with ``ray_report`` every rank also calls ``ray.train.report`` (rank 0
        with the state as a Ray checkpoint). Every rank calls ``state_fn`` (it may be collective, e.g. gathering
        ZeRO-3 partitions); only rank 0 writes.

        ``state_fn()`` returns what a restart needs (e.g. :func:`learner_state`: trainable tensors, optimizer
        moments, the policy's state, ``next_step`` = ``step``); it comes back as ``restored``. On Ray Train
        workers the metrics rank 0 recorded so far go with it (``metrics_rows``), so a restart replays them."""
        if self.checkpoint_every <= 0 or step % self.checkpoint_every != 0:
            return
        if self.checkpoint_dir is None and not self.ray_report:
            return
        state = state_fn()
        if self.is_main_process and self.recorder is not None:
            state = {**state, "metrics_rows": list(self.recorder.rows)}
        if self.checkpoint_dir is not None and self.is_main_process:
            save_checkpoint(self.checkpoint_dir, {**state, "meta": dict(self.checkpoint_meta)})
        if not self.ray_report:
            return
        import tempfile

        import ray.train

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if self.is_main_process:
                torch.save(state, Path(d) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"step": step}, checkpoint=ckpt)


def learner_state(
    model: torch.nn.Module, optimizer: Any, ds_engine: Any, engine: Any, *, next_step: int, **extra: Any
) -> dict[str, Any]:
    """A learner's resumable state: trainable tensors, optimizer moments, the policy's state, the next step.

    Under DeepSpeed the trainable tensors are gathered (collective under ZeRO-3) and the optimizer's partitioned
    moments are not kept: a restarted DeepSpeed learner continues with fresh optimizer state (documented).
    """
    if ds_engine is not None:
        from trainers.distributed import gather_trainable_state

        trainable = gather_trainable_state(ds_engine)
        opt_state = None
    else:
        trainable = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        opt_state = optimizer.state_dict() if optimizer is not None else None
    policy = engine.policy
    return {
        "trainable": trainable,
        "optimizer": opt_state,
        "policy": policy.state_dict() if policy is not None and hasattr(policy, "state_dict") else None,
        "next_step": int(next_step),
        **extra,
    }


def restore_learner_state(learner: Learner, model: torch.nn.Module, optimizer: Any = None) -> int:
    """After a Ray Train restart, load ``learner.restored`` into the plain model (before any DeepSpeed wrap, which
    then builds its partitions from the restored weights) and, without DeepSpeed, the optimizer's moments.

    Returns:
        The step to resume at (0 without a checkpoint).
    """
    state = learner.restored
    if state is None:
        return 0
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = set(named) - set(state["trainable"])
    if missing:
        raise RuntimeError(f"checkpoint lacks trainable tensors {sorted(missing)[:3]}; it is from another model")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(state["trainable"][n].to(p.device))
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["next_step"])


def make_learner_optimizer(
    learner: Learner, model: torch.nn.Module, make_optimizer: Callable[[list[Any]], torch.optim.Optimizer]
) -> tuple[Any, torch.optim.Optimizer | None, Callable[[Sequence[Tensor]], None] | None, int]:
    """Restore a checkpoint if any, then the optimizer: a torch optimizer over the trainable tensors, or (with
    ``deepspeed.enabled``) a DeepSpeed engine whose optimizer the DP engine feeds through ``apply_fn``.

    Returns:
        (deepspeed engine or None, torch optimizer to step after each DP step or None, apply_fn or None,
        the step to start at).
    """
    if learner.deepspeed is None:
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        return None, optimizer, None, restore_learner_state(learner, model, optimizer)
    from trainers.distributed import deepspeed_apply_fn, init_deepspeed

    start = restore_learner_state(learner, model)
    device = "cuda" if learner.device.startswith("cuda") else "cpu"
    ds_engine, _ = init_deepspeed(model, make_optimizer, learner.deepspeed, device=device)
    return ds_engine, None, deepspeed_apply_fn(ds_engine), start


def save_outputs(
    learner: Learner,
    model: torch.nn.Module,
    ds_engine: Any,
    tokenizer: Any,
    *,
    exporter: Callable[[torch.nn.Module, Any, Path], None],
    init: Callable[[], torch.nn.Module],
) -> None:
    """Rank 0 exports the trained model into ``learner.output_dir`` (``exporter(model, tokenizer, out)``).

    Under DeepSpeed the trained tensors are gathered from the engine (collective: every rank calls this) and
    loaded into a model rebuilt on rank 0 by ``init`` (the frozen weights may be partitioned by ZeRO-3).
    """
    trainable = None
    if ds_engine is not None:
        from trainers.distributed import gather_trainable_state

        trainable = gather_trainable_state(ds_engine)
    if learner.world_size > 1:
        # Every rank must hold the same weights: the same secret noise key (broadcast by rank 0), the same samples.
        # A rank that drew its own key would diverge silently (and under DeepSpeed its noise would average down).
        from trainers.distributed import assert_replicated, object_group

        final = list(trainable.values()) if trainable is not None else [
            p.detach() for p in model.parameters() if p.requires_grad]
        assert_replicated(final, group=object_group(), what="the trained weights")
    if not learner.is_main_process:
        return
    if trainable is not None:
        model = init()
        named = dict(model.named_parameters())
        unknown = set(trainable) - set(named)
        if unknown:
            raise RuntimeError(f"trained tensors {sorted(unknown)[:3]} do not exist in the rebuilt model")
        with torch.no_grad():
            for n, v in trainable.items():
                named[n].copy_(v)
    model.to("cpu")
    model.eval()
    out = Path(learner.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    exporter(model, tokenizer, out)


CHECKPOINT_FILE = "state.pt"


def save_checkpoint(directory: Path, state: dict[str, Any]) -> None:
    """Replace ``directory/CHECKPOINT_FILE`` with ``state`` atomically: a temp file, fsync, ``os.replace``, fsync
    of the directory. A crash at any point leaves the previous checkpoint or the new one, never a torn file, and
    only the latest is kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{CHECKPOINT_FILE}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / CHECKPOINT_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(directory: Path | None, *, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The latest checkpoint in ``directory`` (None when there is none), after removing temp files of a write
    that a crash interrupted.

    Raises:
        RuntimeError: the checkpoint was written for another stage, user set or seed (``meta`` differs): it
            cannot be this stage's state; remove the directory or start a new run.
    """
    if directory is None or not Path(directory).is_dir():
        return None
    for stale in Path(directory).glob(f".{CHECKPOINT_FILE}.tmp-*"):
        stale.unlink(missing_ok=True)
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    if state.get("meta") != meta:
        raise RuntimeError(
            f"{path}: checkpoint of {state.get('meta')}, not of this stage ({meta}); remove {directory} or start a "
            "new run directory"
        )
    return state


def resume_step(ctx: StageContext, *, restored_step: int, recorded_steps: int | None = None) -> int:
    """The step a (re)started stage loop begins at: max(checkpoint step, steps the ledger recorded for the stage).

    Every step's event is on the ledger before its update is used (write-ahead), and the ledger is never rolled
    back, so a step the ledger holds has spent its privacy whether or not its update survived the crash. Rerunning
    it would be a second release of the same Poisson sample (the sampler and the noise are seeded per step), so
    a private stage never takes more than its T calibrated events: the loop restarts at the ledger's count, and
    the steps between the checkpoint and that count are skipped -- their updates are lost (the caller reports
    ``steps_lost_in_crash`` = returned - ``restored_step``), their privacy is spent and counted, and the samples
    of later steps are unchanged (seeded per step). A non-private stage restarts at its checkpoint.

    Args:
        ctx: the stage's context; ``ctx.ledger`` is read when ``recorded_steps`` is None.
        restored_step: the step of the restored checkpoint (``restored["next_step"]``; 0 without one).
        recorded_steps: the ledger's count when the ledger is in another process (``Learner.recorded_steps`` in
            a Ray Train worker).

    Raises:
        ValueError: a private stage whose ledger count cannot be read.
    """
    if not ctx.private:
        return int(restored_step)
    if recorded_steps is None:
        if ctx.ledger is None:
            raise ValueError(f"stage {ctx.stage!r}: a private stage resumes from its ledger's count; none given")
        recorded_steps = int(ctx.ledger.recorded_steps(ctx.stage))
    return max(int(restored_step), int(recorded_steps))


def resume_point(ctx: StageContext, learner: Learner, *, restored_step: int) -> tuple[int, int]:
    """(start step, steps lost in crashes so far) of a learner that may hold a checkpoint.

    ``start`` is :func:`resume_step`; the lost count accumulates across crashes through the checkpoint's
    ``steps_lost_in_crash`` (the recipe stores it back into every later checkpoint and its summary).
    """
    start = resume_step(ctx, restored_step=restored_step, recorded_steps=learner.recorded_steps)
    lost = int((learner.restored or {}).get("steps_lost_in_crash", 0)) + start - int(restored_step)
    return start, lost


def restore_policy(engine: Any, restored: dict[str, Any] | None) -> None:
    """Load the clip/noise policy's state (e.g. adaptive thresholds) from a learner checkpoint, if both have one."""
    if restored and engine.policy is not None and hasattr(engine.policy, "load_state_dict"):
        engine.policy.load_state_dict(restored["policy"])


def checkpoint_meta(ctx: StageContext, *, fingerprint: str) -> dict[str, Any]:
    """What a mid-stage checkpoint belongs to: a checkpoint of another stage, user set or seed is refused."""
    return {"stage": ctx.stage, "user_fingerprint": fingerprint, "seed": int(ctx.seed)}


def checkpoint_interval(ctx: StageContext) -> int:
    """``run.checkpoint_every`` (0 where the config has no ``run`` section)."""
    return int(getattr(getattr(ctx.cfg, "run", None), "checkpoint_every", 0))


def local_learner(ctx: StageContext, *, fingerprint: str, out_dir: Path) -> Learner:
    """The in-process learner: rank 0 of 1, the ledger's own record/admit (exactly the pre-Ray behaviour), and
    mid-stage checkpoints in ``ctx.checkpoint_dir`` every ``cfg.run.checkpoint_every`` steps; a checkpoint left by
    a crashed attempt of this stage comes back as ``restored``."""
    hooks: dict[str, Any] = {"is_main_process": True}
    if ctx.private and ctx.ledger is not None:
        ledger = ctx.ledger

        def sink(event: Any) -> None:
            ledger.record(event, stage_fingerprint=fingerprint)

        hooks.update(event_sink=sink, admit=ledger.admit)
    meta = checkpoint_meta(ctx, fingerprint=fingerprint)
    every = checkpoint_interval(ctx) if ctx.checkpoint_dir is not None else 0
    return Learner(
        hooks=hooks, epsilon=lambda: spent_epsilon(ctx), output_dir=out_dir, checkpoint_every=every,
        checkpoint_dir=Path(ctx.checkpoint_dir) if ctx.checkpoint_dir is not None else None, checkpoint_meta=meta,
        restored=load_checkpoint(ctx.checkpoint_dir, meta=meta),
    )


def worker_context(ctx: StageContext) -> StageContext:
    """The picklable part of ``ctx`` that travels to the workers (no ledger file, no TensorBoard writer).

    ``checkpoint_dir`` is made absolute: a worker's working directory need not be the driver's.
    """
    from dataclasses import replace

    ck = Path(ctx.checkpoint_dir).resolve() if ctx.checkpoint_dir is not None else None
    return replace(ctx, ledger=None, metrics=None, policy_factory=None, checkpoint_dir=ck)


def check_distributable(ctx: StageContext) -> None:
    """Refuse, before any privacy is spent, what the Ray Train learners cannot run with the same guarantees."""
    controller_cfg = getattr(ctx.cfg, "controller", None)
    if ctx.policy_factory is not None or (controller_cfg is not None and controller_cfg.enabled):
        raise ValueError(
            f"stage {ctx.stage!r}: the learned controller (controller.enabled or a policy_factory) runs only with "
            "the learner in the driver process, where it reads the ledger's filter; set ray.num_workers=0"
        )


@contextmanager
def ledger_handover(ctx: StageContext) -> Iterator[Any]:
    """Hand the run's ledger to a sink actor for the learners (``cluster.ledger``); yields its handle (None for
    a non-private stage).

    The ledger admits one writer (flock): the driver's handle is closed, the actor reopens the same file, and on
    exit (also after a failure) the actor closes it and the driver reopens it into ``ctx.ledger``. Callers that
    keep their own reference to the ledger must read ``ctx.ledger`` afterwards (the old object is closed).
    """
    if not ctx.private or ctx.ledger is None:
        yield None
        return
    import functools

    from accounting.ledger import Ledger
    from cluster.ledger import start_ledger_sink, stop_ledger_sink

    old = ctx.ledger
    run = old.run
    reopen = functools.partial(
        Ledger.open, old.path, run_id=run.run_id, target_epsilon=run.target_epsilon, target_delta=run.target_delta,
        accountant=run.accountant, composition=run.composition, rdp_order=run.rdp_order,
    )
    old.close()
    try:
        sink = start_ledger_sink(reopen)
    except BaseException:
        ctx.ledger = reopen()
        raise
    try:
        yield sink
    finally:
        try:
            stop_ledger_sink(sink)
        finally:
            ctx.ledger = reopen()


def learner_storage(ctx: StageContext, out_dir: Path) -> str:
    """Ray Train's storage: ``ray.storage_path``, else the run's ``ray_train`` directory (absolute)."""
    configured = ctx.cfg.ray.storage_path
    if configured:
        return configured
    default = ctx.extras.get("ray_storage") or (Path(out_dir).resolve().parent / "ray_train")
    return str(Path(default).resolve())


def run_stage_learner(
    ctx: StageContext,
    learn: Callable[[StageContext, Any, Learner], dict[str, Any]],
    plan: Any,
    *,
    fingerprint: str,
    out_dir: Path,
) -> dict[str, Any]:
    """Run ``learn(ctx, plan, learner)`` in this process, or on ``ray.num_workers`` Ray Train workers when
    ``ctx.distributed``; either way the stage's outputs end up in ``out_dir`` and rank 0's result is returned.

    Distributed: Ray must be up (``cluster.runtime.init_ray``); the ledger goes to a sink actor for the run
    (:func:`ledger_handover`); rank 0 reports the outputs as its final checkpoint, copied here into ``out_dir``;
    its metrics are replayed into ``ctx.metrics``.

    Checkpoints, every ``run.checkpoint_every`` steps: rank 0 writes them into ``ctx.checkpoint_dir`` (as the
    in-process learner does), and with ``ray.max_failures != 0`` also reports them to Ray Train. A restarted
    worker group (``FailureConfig(max_failures=ray.max_failures)``) restores Ray's last checkpoint; a fresh group
    (a run resumed after the driver crashed) restores the one in ``ctx.checkpoint_dir``. Either resumes at
    :func:`resume_step` (rank 0 reads the ledger's count from the sink actor): events already on the ledger stay
    counted and are never taken again. ``ctx.checkpoint_dir`` is written and read by rank 0's worker and removed
    by the driver, so on a multi-node cluster the run directory must be on storage shared by every node (NFS or
    similar); on one machine it is a local directory.
    """
    out_dir = Path(out_dir)
    if not ctx.distributed:
        return learn(ctx, plan, local_learner(ctx, fingerprint=fingerprint, out_dir=out_dir))
    check_distributable(ctx)
    from cluster.train import run_learners

    ray_cfg = ctx.cfg.ray
    with ledger_handover(ctx) as sink:
        result = run_learners(
            _ray_learner_entry,
            {
                "learn": learn, "ctx": worker_context(ctx), "plan": plan, "sink": sink,
                "fingerprint": fingerprint,
                "checkpoint_every": checkpoint_interval(ctx),
                "ray_report": ray_cfg.max_failures != 0,
            },
            num_workers=ray_cfg.num_workers,
            use_gpu=ray_cfg.use_gpu,
            cpus_per_worker=ray_cfg.cpus_per_worker,
            resources_per_worker=ray_cfg.resources_per_worker,
            max_failures=ray_cfg.max_failures,
            collective_timeout_s=ray_cfg.collective_timeout_s,
            storage_path=learner_storage(ctx, out_dir),
            name=f"{ctx.stage}-learners",
        )
    if result.checkpoint is None:
        raise RuntimeError(f"stage {ctx.stage!r}: the learners finished without reporting their outputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    result.checkpoint.to_directory(str(out_dir))
    final = out_dir / "learner_result.pt"
    outcome = torch.load(final, weights_only=False)
    final.unlink()
    if ctx.metrics is not None:
        for row in outcome.pop("metrics_rows", []):
            ctx.metrics.log(row["key"], row["value"], step=row["step"], stage=row["stage"],
                            private=row["private"], released=row["released"])
    return outcome["result"]


def _ray_learner_entry(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker: build the Learner from the Ray context, run ``learn``, and on rank 0
    report the stage's outputs (and the summary and metrics) as the final checkpoint.

    The state to start from: Ray Train's last checkpoint (a restarted worker group), else the latest one in
    ``ctx.checkpoint_dir`` (a run resumed after the driver crashed mid-stage), read by rank 0 and broadcast.
    """
    import tempfile

    import ray.train

    from cluster.ledger import remote_admit, remote_epsilon, remote_event_writer
    from cluster.train import worker_info
    from trainers.distributed import allreduce_sum_fn

    info = worker_info()
    ctx: StageContext = config["ctx"]
    sink = config["sink"]
    meta = checkpoint_meta(ctx, fingerprint=config["fingerprint"])
    recorder = LearnerMetrics()
    restored = _restored_on_every_rank(ctx, meta=meta, rank=info.rank, world_size=info.world_size)
    if restored is not None:
        recorder.rows = list(restored.get("metrics_rows", []))
    hooks: dict[str, Any] = {"is_main_process": info.is_main_process}
    if info.world_size > 1:
        hooks["reduce_fn"] = allreduce_sum_fn()
    epsilon: Callable[[], float] = lambda: 0.0  # noqa: E731
    if sink is not None and info.is_main_process:
        hooks["event_sink"] = remote_event_writer(sink, stage_fingerprint=config["fingerprint"])
        hooks["admit"] = remote_admit(sink)
        epsilon = remote_epsilon(sink, ctx.stage)
    device = "cpu"
    if ctx.cfg.ray.use_gpu:
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    recorded = None
    if sink is not None:
        recorded = _ledger_count_on_every_rank(sink, ctx.stage, rank=info.rank, world_size=info.world_size,
                                               device=device)
    from dataclasses import replace

    ctx = replace(ctx, metrics=recorder if info.is_main_process else None, progress=ctx.progress and info.rank == 0)
    with tempfile.TemporaryDirectory() as out:
        learner = Learner(
            rank=info.rank, world_size=info.world_size, hooks=hooks, epsilon=epsilon, output_dir=Path(out),
            device=device, deepspeed=ctx.cfg.deepspeed if ctx.cfg.deepspeed.enabled else None,
            restored=restored, checkpoint_every=int(config["checkpoint_every"]), recorder=recorder,
            recorded_steps=recorded, checkpoint_dir=Path(ctx.checkpoint_dir) if ctx.checkpoint_dir else None,
            checkpoint_meta=meta, ray_report=bool(config["ray_report"]),
        )
        result = config["learn"](ctx, config["plan"], learner)
        if info.is_main_process:
            torch.save({"result": result, "metrics_rows": recorder.rows}, Path(out) / "learner_result.pt")
            ray.train.report({"done": True}, checkpoint=ray.train.Checkpoint.from_directory(out))
        else:
            ray.train.report({"done": True})


def _restored_on_every_rank(
    ctx: StageContext, *, meta: dict[str, Any], rank: int, world_size: int
) -> dict[str, Any] | None:
    """The state a Ray Train worker starts from: Ray's last checkpoint, else ``ctx.checkpoint_dir``'s, else None.

    Ray hands every rank the same checkpoint. The directory is read by rank 0 only and the state broadcast (on
    a gloo group), so every rank starts from the same bytes even where another node's view of the directory
    lags. Collective when ``world_size > 1``.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            return torch.load(Path(d) / CHECKPOINT_FILE, weights_only=False)
    if ctx.checkpoint_dir is None:
        return None
    state: Any = None
    if rank == 0:
        try:
            state = load_checkpoint(ctx.checkpoint_dir, meta=meta)
        except RuntimeError as err:  # not this stage's checkpoint: every rank fails with rank 0's reason
            state = err
    if world_size > 1:
        from trainers.distributed import broadcast_object, object_group

        state = broadcast_object(state, group=object_group())
    if isinstance(state, RuntimeError):
        raise RuntimeError(str(state))
    return state


def _ledger_count_on_every_rank(sink: Any, stage: str, *, rank: int, world_size: int, device: str) -> int:
    """The ledger's count of ``stage``'s steps, read by rank 0 from the sink actor and broadcast, so every rank
    starts at the same step (a rank reading it later could see rank 0's next event already recorded)."""
    import ray

    count = int(ray.get(sink.recorded_steps.remote(stage))) if rank == 0 else 0
    if world_size > 1:
        import torch.distributed as dist

        box = torch.tensor([count], dtype=torch.int64, device=device)
        dist.broadcast(box, src=0)
        count = int(box.item())
    return count


def share_admission(ctx: StageContext, learner: Any, engine: Any) -> Any:
    """Make rank 0's privacy-filter answer reach every rank before each step's all-reduce (a ``SharedAdmission``).

    Why: only rank 0 asks the filter. When it refuses, rank 0 leaves the loop while the other ranks already wait
    in the all-reduce of the clipped sums: they would block until ``ray.collective_timeout_s`` and fail the
    learner group, turning a clean "refused" stage into a crash. The gate wraps rank 0's ``engine.admit`` and
    ``engine.event_sink`` (the engine reads them at every step) so each answer is broadcast; the other ranks call
    ``gate.admitted()`` right before ``engine.step``. Disabled (nothing sent or awaited) for one rank or a
    non-private stage. Collective under NCCL (a gloo group for the objects is created): every rank calls it.
    """
    from trainers.distributed import SharedAdmission, object_group

    many = learner.world_size > 1 and ctx.private
    gate = SharedAdmission(enabled=many, is_main_process=learner.is_main_process,
                           group=object_group() if many else None)
    if many and learner.is_main_process:
        hooks = gate.wrap({"event_sink": engine.event_sink, "admit": engine.admit})
        engine.event_sink, engine.admit = hooks["event_sink"], hooks["admit"]
    return gate


def poisson_loop(
    ctx: StageContext,
    learner: Any,
    engine: Any,
    optimizer: Any,
    *,
    users: UserIndex,
    records: dict[str, Tensor],
    loss_fn: Callable[[Any], Tensor],
    sampler: Any,
    steps: int,
    start: int,
    eval_every: int,
    evaluate: Callable[[int], dict[str, str]] | None,
    state: Callable[[int], dict[str, Any]],
    desc: str,
) -> tuple[str, str, int]:
    """The step loop shared by the Poisson-sampled stages (SFT, reward model): sample -> this rank's shard ->
    engine step (clip, noise once, ledger event first) -> optimizer step; every ``eval_every`` steps log epsilon
    and ``evaluate(done)`` (PUBLIC metrics; returns progress-bar items); checkpoint ``state(done)``.

    Returns:
        (status "completed" or "refused", reason, steps done).
    """
    from accounting.ledger import BudgetExceededError
    from trainers.distributed import shard_users
    from trainers.engine.engine import UserBatch

    main = learner.is_main_process
    gate = share_admission(ctx, learner, engine)
    status, reason, done = "completed", "", start
    bar = progress_bar(ctx, steps, f"{desc} ({'DP' if ctx.private else 'non-private'})")
    bar.update(start)
    try:
        for step in range(start, steps):
            mine = shard_users(sampler.sample(step), rank=learner.rank, world_size=learner.world_size)
            idx = users.records_of(mine)
            sample = UserBatch(records={k: v[idx] for k, v in records.items()}, user_ids=users.record_user[idx])
            try:
                if not gate.admitted():
                    raise BudgetExceededError(
                        f"stage {ctx.stage!r} step {step} not taken: rank 0's privacy filter refused it"
                    )
                result = engine.step(sample, loss_fn)
            except BudgetExceededError as err:
                status, reason = "refused", str(err)
                break
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if result.released is not None and main:
                norm = float(sum(v * v for v in result.released.noisy_grad_norms) ** 0.5)
                ctx.log("privacy/noisy_grad_norm", norm, step=done, private=True, released=True)
                ctx.log("privacy/sigma_eff", result.event.noise_multiplier, step=done)
            if done % eval_every == 0 or done == steps:
                post: dict[str, str] = {}
                if ctx.private and main:
                    eps = learner.epsilon()
                    ctx.log("privacy/epsilon", eps, step=done)
                    post["eps"] = f"{eps:.2f}"
                if evaluate is not None:
                    post.update(evaluate(done))
                bar.set_postfix(post)
            learner.checkpoint(lambda d=done: state(d), step=done)
            bar.update(1)
    finally:
        bar.close()
        engine.close()
    return status, reason, done

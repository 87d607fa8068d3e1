"""The learner of a stage, the same in this process and on every Ray Train rank: its policy and DP engine, the
secret noise key, the optimizer (torch or DeepSpeed), checkpoints and the resume point, and the Poisson loop
shared by SFT and the reward model.

What every private learner does:

    noise = stage_noise_seed(ctx, learner)                   # secret, drawn by rank 0, shared with the ranks
    engine = build_engine(ctx, model, q=q, users=users, noise_seed=noise, sigma=plan.noise_multiplier, ...)
    sampler = PoissonUserSampler(N, sampling_rate=q, seed=noise)
    poisson_loop(...)   # sample -> shard -> engine.step (clip, noise once, ledger event first) -> optimizer step

sigma comes from the stage's frozen ``StagePlan`` (``trainers.stages.plan``); nothing here calibrates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainers.engine.policy import group_thresholds
from trainers.engine.sampling import NoiseSeed
from trainers.stages.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from trainers.stages.context import (
    StageContext,
    UserIndex,
    progress_bar,
    reproducible_noise,
    secure_rng,
    spent_epsilon,
)

ENGINE_GROUPING = {"per_module": "module", "per_tensor": "per_tensor", "flat": "flat"}


def make_policy(
    ctx: StageContext, *, sigma: float, groups: Sequence[Any], expected_batch_size: float, **plan: Any
) -> Any:
    """The stage's clip/noise policy: ``ctx.policy_factory`` (the learned controller, which the pipeline passes in
    when ``controller.enabled``: the stages never import the controller), else fixed / per-layer / adaptive from
    the ``engine`` config.

    ``plan`` carries the public schedule the controller needs (``steps``, ``sampling_rate``, ``repeats``) and a
    ``validation_loss`` callable on PUBLIC data.
    """
    from trainers.engine.policy import AdaptiveClippingPolicy, FixedPolicy, PerLayerFixedPolicy

    eng = ctx.cfg.engine
    factory = ctx.policy_factory
    controller_cfg = getattr(ctx.cfg, "controller", None)
    if factory is None and controller_cfg is not None and controller_cfg.enabled:
        raise ValueError(
            f"stage {ctx.stage!r}: controller.enabled=true but the context has no policy_factory; pass "
            "controller.policy.controller_policy_factory(cfg.controller) as StageContext.policy_factory (the "
            "pipeline does)"
        )
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


def clipping_group_names(engine_cfg: Any, model: torch.nn.Module) -> list[str]:
    """The names of the clipping groups the stage's engine will make for ``model`` (``engine.clipping``), in
    order: public facts of the model, known before any release (the controller's reuse check uses them)."""
    from trainers.engine.engine import clipping_groups, trainable_named_parameters

    params = trainable_named_parameters(model)
    return [n for n, _ in clipping_groups(model, params, ENGINE_GROUPING[engine_cfg.clipping])]


def stage_group_names(cfg: Any, base_dir: Path | str, stages: Sequence[str]) -> dict[str, list[str]]:
    """Before any release: the clipping-group names each learner stage's engine will have, from the base model's
    architecture (the SFT output the reward model and PPO start from is the same architecture, merged): SFT is the
    base with the SFT LoRA, the reward model the base with its LoRA and a score head, PPO the base with its LoRA
    and a value head, built as the stages build them. Public facts; the global torch RNG is left as it was."""
    from trainers.models.base import load_base_model
    from trainers.models.lora import add_lora
    from trainers.rlhf.heads import PolicyValueModel, ScoreModel

    wrap = {"sft": lambda m: m, "rm": ScoreModel, "ppo": PolicyValueModel}
    out: dict[str, list[str]] = {}
    with torch.random.fork_rng(devices=[]):
        for stage in stages:
            lora = getattr(cfg, stage).lora
            model, _ = load_base_model(base_dir)
            model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                             target_modules=tuple(lora.target_modules))
            out[stage] = clipping_group_names(cfg.engine, wrap[stage](model))
    return out


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
    from trainers.distributed import RankZeroPolicy
    from trainers.engine.engine import DPEngine, clipping_groups, trainable_named_parameters

    grouping = ENGINE_GROUPING[ctx.cfg.engine.clipping]
    hooks: dict[str, Any]
    if learner is not None:
        hooks = {k: v for k, v in learner.hooks.items() if ctx.private or k not in ("event_sink", "admit")}
    elif ctx.private and ctx.ledger is not None:  # a private stage without either is refused below
        hooks = ledger_hooks(ctx.ledger, fingerprint=users.fingerprint)
    else:
        hooks = {}
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
        many = learner is not None and learner.world_size > 1
        main = learner is None or learner.is_main_process

        def decide() -> Any:
            return make_policy(
                ctx, sigma=sigma, groups=specs, expected_batch_size=q * users.num_users, steps=steps,
                sampling_rate=q, repeats=repeats, validation_loss=validation_loss, admit=hooks.get("admit"),
            )

        # On several ranks rank 0 alone decides each step's plan; it travels with the admission answer
        # (share_admission), so the plan the ledger accounts for is the one every rank releases with.
        policy = RankZeroPolicy(decide() if main else None, is_main_process=main) if many else decide()
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


def ledger_hooks(ledger: Any, *, fingerprint: str) -> dict[str, Any]:
    """The engine's ``event_sink`` and ``admit`` on a ledger in this process: every event is recorded (durably,
    before the release) against the stage's user fingerprint, and the ledger's filter answers admission."""

    def sink(event: Any) -> None:
        ledger.record(event, stage_fingerprint=fingerprint)

    return {"event_sink": sink, "admit": ledger.admit}


def local_learner(ctx: StageContext, *, fingerprint: str, out_dir: Path) -> Learner:
    """The in-process learner: rank 0 of 1, the ledger's own record/admit (exactly the pre-Ray behaviour), and
    mid-stage checkpoints in ``ctx.checkpoint_dir`` every ``cfg.run.checkpoint_every`` steps; a checkpoint left by
    a crashed attempt of this stage comes back as ``restored``."""
    hooks: dict[str, Any] = {"is_main_process": True}
    if ctx.private and ctx.ledger is not None:
        hooks.update(ledger_hooks(ctx.ledger, fingerprint=fingerprint))
    meta = checkpoint_meta(ctx, fingerprint=fingerprint)
    every = checkpoint_interval(ctx) if ctx.checkpoint_dir is not None else 0
    return Learner(
        hooks=hooks, epsilon=lambda: spent_epsilon(ctx), output_dir=out_dir, checkpoint_every=every,
        checkpoint_dir=Path(ctx.checkpoint_dir) if ctx.checkpoint_dir is not None else None, checkpoint_meta=meta,
        restored=load_checkpoint(ctx.checkpoint_dir, meta=meta),
    )


def share_admission(ctx: StageContext, learner: Any, engine: Any) -> Any:
    """Make rank 0's privacy-filter answer reach every rank before each step's all-reduce (a ``SharedAdmission``).

    Why: only rank 0 asks the filter. When it refuses, rank 0 leaves the loop while the other ranks already wait
    in the all-reduce of the clipped sums: they would block until ``ray.collective_timeout_s`` and fail the
    learner group, turning a clean "refused" stage into a crash. The gate wraps rank 0's ``engine.admit`` and
    ``engine.event_sink`` (the engine reads them at every step) so each answer is broadcast; the other ranks call
    ``gate.admitted()`` right before ``engine.step``. Disabled (nothing sent or awaited) for one rank or a
    non-private stage. Collective under NCCL (a gloo group for the objects is created): every rank calls it.
    """
    from trainers.distributed import RankZeroPolicy, SharedAdmission, object_group

    many = learner.world_size > 1 and ctx.private
    shares_plan = many and isinstance(engine.policy, RankZeroPolicy)
    gate = SharedAdmission(
        enabled=many, is_main_process=learner.is_main_process, group=object_group() if many else None,
        payload=(lambda: engine.policy.last) if shares_plan else None,
        on_payload=engine.policy.receive if shares_plan else None,
    )
    if many and learner.is_main_process:
        hooks = gate.wrap({"event_sink": engine.event_sink, "admit": engine.admit})
        engine.event_sink, engine.admit = hooks["event_sink"], hooks["admit"]
    return gate


def admitted_step(
    ctx: StageContext, gate: Any, engine: Any, optimizer: Any, batch: Any, loss_fn: Callable[[Any], Tensor], *,
    step: int, repeats: int = 1,
) -> Any:
    """One logical step of every stage loop: rank 0's filter answer reaches this rank first (:func:`share_admission`),
    then the ``repeats`` releases of the ONE sample (PPO's K epochs; the event, repeats=K, is written before release
    0), each followed by the optimizer step.

    Returns:
        The first release's ``StepResult`` (the one that carries the step's event).

    Raises:
        accounting.ledger.BudgetExceededError: the filter refused the step; nothing was released or applied.
    """
    from accounting.ledger import BudgetExceededError

    if not gate.admitted():
        raise BudgetExceededError(f"stage {ctx.stage!r} step {step} not taken: rank 0's privacy filter refused it")
    first = None
    for k in range(repeats):
        result = engine.step(batch, loss_fn, repeats=repeats, release=k)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        first = result if first is None else first
    return first


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
                result = admitted_step(ctx, gate, engine, optimizer, sample, loss_fn, step=step)
            except BudgetExceededError as err:
                status, reason = "refused", str(err)
                break
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

"""Where a stage's learner runs: this process, or Ray Train TorchTrainer workers (``ray.num_workers >= 1``).

A learner stage is split in two plain functions:
  * a driver-side part (the recipe, ``run_sft``/``run_rm``/``run_ppo``): load the data, index the users, take the
    stage's frozen plan (q, steps, sigma), ``ledger.begin_stage``; afterwards ``end_stage`` and the summary;
  * a per-rank ``learn(ctx, plan, learner)``: rebuild the model from the stage's input directory, draw the SAME
    Poisson sample on every rank, keep this rank's slice (``shard_users``), one engine step (clipped sums are
    all-reduced before the noise, which every rank draws from the same (seed, step) stream), apply the update
    (torch optimizer, or DeepSpeed's), and on rank 0 save the outputs into ``learner.output_dir``.
In-process (the default) ``learn`` runs here with one rank and the ledger itself as the event sink, so results
do not depend on the number of workers. All the Ray plumbing of a learner is in this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainers.stages.checkpoint import CHECKPOINT_FILE, load_checkpoint
from trainers.stages.context import StageContext
from trainers.stages.learner import (
    Learner,
    LearnerMetrics,
    checkpoint_interval,
    checkpoint_meta,
    local_learner,
)


def worker_context(ctx: StageContext) -> StageContext:
    """The picklable part of ``ctx`` that travels to the workers (no ledger file, no TensorBoard writer).

    ``checkpoint_dir`` is made absolute: a worker's working directory need not be the driver's. The policy
    factory (the learned controller) travels: rank 0 builds the policy, the other ranks release with its plans.
    """
    from dataclasses import replace

    ck = Path(ctx.checkpoint_dir).resolve() if ctx.checkpoint_dir is not None else None
    return replace(ctx, ledger=None, metrics=None, checkpoint_dir=ck)


def check_distributable(ctx: StageContext) -> None:
    """Refuse, before any privacy is spent, what cannot travel to the Ray Train learners: a policy factory that
    does not pickle (it is built again on rank 0 of the workers)."""
    if ctx.policy_factory is None:
        return
    import ray.cloudpickle

    try:
        ray.cloudpickle.dumps(ctx.policy_factory)
    except Exception as err:  # noqa: BLE001 - any pickling failure is the same refusal
        raise ValueError(
            f"stage {ctx.stage!r}: StageContext.policy_factory cannot be sent to the Ray Train learners ({err}); "
            "use a module-level factory (controller.policy.controller_policy_factory) or set ray.num_workers=0"
        ) from None


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
    default = ctx.ray_storage or (Path(out_dir).resolve().parent / "ray_train")
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


def engine_hooks(sink: Any = None, *, stage_fingerprint: str | None = None) -> dict[str, Any]:
    """Keyword arguments that make a ``trainers.engine.DPEngine`` data-parallel inside a Ray Train worker.

    ``reduce_fn`` sums the clipped sums across ranks before noise (absent with one worker), ``is_main_process``
    is rank 0, and on rank 0 ``event_sink`` / ``admit`` go to the driver's ledger through ``sink`` (a
    ``cluster.ledger.start_ledger_sink`` handle). ``sink=None`` leaves them out (non-private runs, or a caller
    that passes its own). Pass ``apply_fn`` separately (plain optimizer or ``deepspeed_apply_fn``).
    """
    from cluster.ledger import remote_admit, remote_event_writer
    from cluster.train import worker_info
    from trainers.distributed import allreduce_sum_fn

    info = worker_info()
    hooks: dict[str, Any] = {"is_main_process": info.is_main_process}
    if info.world_size > 1:
        hooks["reduce_fn"] = allreduce_sum_fn()
    if sink is not None and info.is_main_process:
        hooks["event_sink"] = remote_event_writer(sink, stage_fingerprint=stage_fingerprint)
        hooks["admit"] = remote_admit(sink)
    return hooks


def _ray_learner_entry(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker: build the Learner from the Ray context, run ``learn``, and on rank 0
    report the stage's outputs (and the summary and metrics) as the final checkpoint.

    The state to start from: Ray Train's last checkpoint (a restarted worker group), else the latest one in
    ``ctx.checkpoint_dir`` (a run resumed after the driver crashed mid-stage), read by rank 0 and broadcast.
    """
    import tempfile

    import ray.train

    from cluster.ledger import remote_epsilon
    from cluster.train import worker_info

    info = worker_info()
    ctx: StageContext = config["ctx"]
    sink = config["sink"]
    meta = checkpoint_meta(ctx, fingerprint=config["fingerprint"])
    recorder = LearnerMetrics()
    restored = _restored_on_every_rank(ctx, meta=meta, rank=info.rank, world_size=info.world_size)
    if restored is not None:
        recorder.rows = list(restored.get("metrics_rows", []))
    hooks = engine_hooks(sink, stage_fingerprint=config["fingerprint"])
    epsilon: Callable[[], float] = lambda: 0.0  # noqa: E731
    if sink is not None and info.is_main_process:
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

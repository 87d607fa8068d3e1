"""Learners as Ray Train workers: ``TorchTrainer`` with a gloo (CPU) or NCCL (GPU) process group per run.

:func:`run_learners` is the only place that builds Ray Train objects, so stage recipes stay plain functions of
(config) that run on every rank. Inside a worker, torch.distributed is already initialized by Ray Train:
``trainers.distributed.allreduce_sum_fn()`` and DeepSpeed (``init_deepspeed``) use that group as is.

Results reach the driver through Ray Train itself: each rank calls ``ray.train.report(metrics, checkpoint=...)``
(rank 0 with the checkpoint), and :func:`run_learners` returns the ``Result`` with rank 0's last metrics and
checkpoint. Privacy events go through ``cluster.ledger`` (write-ahead on the driver's disk), not through report,
because report is asynchronous with respect to the update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerInfo:
    """Where this learner sits in the group (valid inside a Ray Train worker).

    Attributes:
        rank: global rank in [0, world_size).
        world_size: number of learner workers.
        local_rank: rank on this node (selects the GPU).
    """

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main_process(self) -> bool:
        """Rank 0: the only rank that emits privacy events and writes checkpoints."""
        return self.rank == 0


def worker_info() -> WorkerInfo:
    """This worker's rank and world size (Ray Train context)."""
    import ray.train

    ctx = ray.train.get_context()
    return WorkerInfo(
        rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), local_rank=ctx.get_local_rank()
    )


def _learner_entry(train_loop_per_worker: Callable[[dict[str, Any]], Any], config: dict[str, Any]) -> Any:
    """Every learner rank: keep freed memory in the worker (``dpalign.allocator``; a worker on a cluster node did
    not inherit the driver's setting), then the loop."""
    from dpalign.allocator import keep_freed_memory

    keep_freed_memory()
    return train_loop_per_worker(config)


def run_learners(
    train_loop_per_worker: Callable[[dict[str, Any]], Any],
    config: Mapping[str, Any],
    *,
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    resources_per_worker: Mapping[str, float] | None = None,
    max_failures: int = 0,
    storage_path: str,
    name: str = "learners",
    resume_from_checkpoint: Any = None,
    collective_timeout_s: int = 1800,
) -> Any:
    """Run ``train_loop_per_worker(config)`` on ``num_workers`` Ray Train workers and return the Result.

    Ray must be initialized (``cluster.runtime.init_ray``). Raises Ray Train's ``TrainingFailedError`` when the
    workers fail more than ``max_failures`` times.

    Args:
        train_loop_per_worker: a top-level (picklable) function; it runs on every rank with the process group up.
        config: passed to every worker (keep it small: paths and plain values; large objects go through the
            object store or shared storage).
        num_workers: data-parallel ranks.
        use_gpu: one GPU per worker, NCCL; else CPU and gloo.
        cpus_per_worker: CPUs reserved per worker.
        resources_per_worker: extra custom resources per worker.
        max_failures: worker-group restarts after a failure (-1 unlimited); restarted workers get the last
            reported checkpoint from ``ray.train.get_checkpoint()``.
        storage_path: where Ray Train writes checkpoints (the run directory or shared storage).
        name: the run's name under ``storage_path``.
        resume_from_checkpoint: a ``ray.train.Checkpoint`` to start from.
        collective_timeout_s: process-group timeout; a rank blocked in an all-reduce with a dead peer fails after
            this long instead of hanging, so Ray Train can restart the group.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: must be >= 1 (ray.num_workers)")
    if max_failures < -1:
        raise ValueError(f"max_failures={max_failures}: must be >= -1 (ray.max_failures)")
    resources = {"CPU": float(cpus_per_worker), **dict(resources_per_worker or {})}
    if use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        functools.partial(_learner_entry, train_loop_per_worker),
        train_loop_config=dict(config),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(collective_timeout_s)),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        resume_from_checkpoint=resume_from_checkpoint,
    )
    return trainer.fit()

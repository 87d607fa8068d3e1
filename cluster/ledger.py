"""Privacy events from learner workers to the driver-owned ledger, write-ahead.

Design choice. The driver owns the ledger (DESIGN §4): ``accounting.ledger.Ledger`` on RUN_DIR/ledger.jsonl, one
writer, held by an exclusive flock. Learners run in Ray Train workers, possibly on other machines without a shared
filesystem, so rank 0 never opens the file. For the duration of a learner run the driver hands the ledger to a
:class:`LedgerSink` actor pinned to the DRIVER's node (the driver closes its handle, the sink reopens the same
file with the same run arguments, and gives it back when the run ends). Rank 0's engine calls

  * ``admit=remote_admit(sink)``: the privacy filter, evaluated on the ledger, before anything is computed;
  * ``event_sink=remote_event_writer(sink)``: ``Ledger.record`` appends, flushes and fsyncs the event line, and
    only then does the call return.

Rank 0 blocks on that reply before its ``apply_fn`` runs, and the other ranks cannot apply before rank 0 joins
the next collective, so write-ahead holds across processes: the event is on the driver's disk before any rank's
parameters change. A worker that dies after the write leaves the event counted: a crash over-counts, never
under-counts. Other ranks never write (the engine gates emission on ``is_main_process``).

Cost: one actor round trip per DP step (about a millisecond locally), negligible beside a training step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class _LedgerSinkImpl:
    """Actor body: owns the ledger object on the driver's node; calls arrive in order (one actor thread)."""

    def __init__(self, open_ledger: Callable[[], Any]) -> None:
        self._ledger = open_ledger()

    def record(self, event: Any, stage_fingerprint: str | None = None) -> int:
        self._ledger.record(event, stage_fingerprint=stage_fingerprint)
        return len(self._ledger.events())

    def epsilon(self, stage: str | None = None) -> float:
        return float(self._ledger.epsilon(stage))

    def admit(self, event: Any) -> Any:
        return self._ledger.admit(event)

    def recorded_steps(self, stage: str) -> int:
        return int(self._ledger.recorded_steps(stage))

    def close(self) -> None:
        self._ledger.close()


def start_ledger_sink(open_ledger: Callable[[], Any]) -> Any:
    """Start the sink actor on this (the driver's) node and return its handle, to pass to the learners.

    Close the driver's own ledger handle first (the ledger admits one writer) and reopen it after
    :func:`stop_ledger_sink`.

    Args:
        open_ledger: a picklable zero-argument factory run inside the actor, e.g.
            ``functools.partial(Ledger.open, run_dir / "ledger.jsonl", run_id=..., target_epsilon=...,
            target_delta=..., accountant=..., composition=...)`` (the same arguments as the driver's, so it
            resumes the same file). The object needs ``record(event)`` (durable on return), ``admit(event)``,
            ``events()`` and ``close()``.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(_LedgerSinkImpl)
    sink = actor_cls.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    ).remote(open_ledger)
    ray.get(
        sink.__ray_ready__.remote()
    )  # surface a bad factory (locked file, wrong run) here, not in a worker
    return sink


def stop_ledger_sink(sink: Any) -> None:
    """Close the sink's ledger (releasing the file lock) and end the actor."""
    import ray

    ray.get(sink.close.remote())
    ray.kill(sink)


def remote_event_writer(sink: Any, *, stage_fingerprint: str | None = None) -> Callable[[Any], None]:
    """In rank 0: the engine's ``event_sink``. Sends the PrivacyEvent and BLOCKS until it is on the driver's
    disk; a refusal by the ledger (budget, unknown stage, a ``stage_fingerprint`` that is not the stage's user
    set) is raised here, before anything is released."""
    import ray

    def emit(event: Any) -> None:
        ray.get(sink.record.remote(event, stage_fingerprint))

    return emit


def remote_epsilon(sink: Any, stage: str) -> Callable[[], float]:
    """In rank 0: epsilon spent so far by ``stage`` on the driver's ledger (public; for logs and progress)."""
    import ray

    def epsilon() -> float:
        return float(ray.get(sink.epsilon.remote(stage)))

    return epsilon


def remote_admit(sink: Any) -> Callable[[Any], Any]:
    """In rank 0: the engine's ``admit`` (the privacy filter on the driver's ledger); returns its Admission."""
    import ray

    def admit(event: Any) -> Any:
        return ray.get(sink.admit.remote(event))

    return admit

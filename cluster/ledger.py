"""Privacy events from learner workers to the driver-owned ledger, write-ahead.

Design choice. The driver owns the ledger file (DESIGN §4). Learners run in Ray Train workers, possibly on other
machines without a shared filesystem, so rank 0 does not open the file itself: it sends each event to a
:class:`LedgerSink` actor pinned to the DRIVER's node, which appends the line, flushes and fsyncs, and only then
returns. Rank 0 blocks on that reply (:func:`remote_event_writer`) before the update is applied, so
write-ahead holds across processes: the event is on the driver's disk before any rank's parameters change (the
other ranks wait for rank 0 in the next collective, and rank 0 applies only after the reply). If a worker dies
after the write, the event stays counted: a crash over-counts, never under-counts. Other ranks never write (the
engine gates emission on ``is_main_process``).

Cost: one actor round trip per DP step (about a millisecond locally), negligible beside a training step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class JsonlAppender:
    """Append one JSON object per line; each append is flushed and fsynced before it returns."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


class _LedgerSinkImpl:
    """Actor body: owns one appender on the driver's node; appends arrive in call order (one actor thread)."""

    def __init__(self, open_appender: Callable[[], Any]) -> None:
        self._appender = open_appender()
        self._count = 0

    def append(self, record: dict[str, Any]) -> int:
        self._appender.append(record)
        self._count += 1
        return self._count

    def count(self) -> int:
        return self._count

    def close(self) -> None:
        closer = getattr(self._appender, "close", None)
        if callable(closer):
            closer()


def start_ledger_sink(path: str | os.PathLike, open_appender: Callable[[], Any] | None = None) -> Any:
    """Start a :class:`LedgerSink` actor on this (the driver's) node; returns its handle to pass to learners.

    Args:
        path: the ledger file on the driver's disk (used by the default JSONL appender).
        open_appender: a picklable zero-argument factory returning an object with ``append(record: dict)`` that
            is durable when it returns (default: :class:`JsonlAppender` on ``path``). Lets the accounting
            package's ledger writer be used unchanged.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    factory = open_appender or _JsonlFactory(str(Path(path).resolve()))
    node_id = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(_LedgerSinkImpl)
    return actor_cls.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    ).remote(factory)


class _JsonlFactory:
    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self) -> JsonlAppender:
        return JsonlAppender(self.path)


def remote_event_writer(sink: Any) -> Callable[[Any], None]:
    """In a worker: ``emit(event)`` sends ``event.to_dict()`` (or a dict) to the sink and BLOCKS until it is on
    disk. Use it as the engine's event callback on rank 0 only."""
    import ray

    def emit(event: Any) -> None:
        record = event if isinstance(event, dict) else event.to_dict()
        ray.get(sink.append.remote(record))

    return emit

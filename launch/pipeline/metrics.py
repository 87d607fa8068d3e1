"""Namespaced training metrics to TensorBoard and metrics.jsonl, with private statistics refused unless released.

Keys are ``namespace/name`` (cleanrl style): ``losses/`` (training losses), ``privacy/`` (epsilon spent,
sigma_eff, sampling rate), ``ppo/`` (kl, reward, clipfrac), ``perf/`` (steps_per_sec, seconds), ``eval/`` (held-out
public evaluation), ``rollout/`` (actor sync bytes and seconds), ``charts/`` (learning rate, beta). Each stage
writes to its own TensorBoard run (``tb/<stage>/``), so the same key (``privacy/epsilon``) of SFT, RM and PPO
overlays in one chart.

The privacy rule, made structural: every ``log`` call must say whether the value was computed from private data
(``private=True/False``, keyword-only, no default). A private value is accepted only with ``released=True``,
which the caller may set only for a value that left the DP mechanism with noise and a ledger event (the noisy
loss of a release with purpose "metric", a noisy clip count). A raw private statistic -- a per-batch loss, a
mean reward of private rollouts, a realized batch size -- raises :class:`PrivateMetricError` and is never
written. Public values (epsilon from the ledger, eval on public prompts, throughput) pass with private=False.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

NAMESPACES: tuple[str, ...] = ("losses", "privacy", "ppo", "perf", "eval", "rollout", "charts")
_KEY = re.compile(r"^([a-z]+)/[A-Za-z0-9_./-]+$")


class PrivateMetricError(ValueError):
    """A statistic of private data was about to be logged without a noisy, accounted release."""


class MetricKeyError(ValueError):
    """A metric key is not ``namespace/name`` with a known namespace."""


def check_key(key: str) -> str:
    """Return ``key`` if it is ``namespace/name`` with namespace in :data:`NAMESPACES`.

    Raises:
        MetricKeyError: naming the allowed namespaces.
    """
    match = _KEY.match(key)
    if match is None or match.group(1) not in NAMESPACES:
        raise MetricKeyError(
            f"metric key {key!r}: use 'namespace/name' with namespace one of {', '.join(NAMESPACES)} "
            "(e.g. losses/sft, privacy/epsilon, ppo/kl, perf/steps_per_sec)"
        )
    return key


def _check_provenance(key: str, *, stage: str, private: bool, released: bool) -> None:
    if not isinstance(private, bool) or not isinstance(released, bool):
        raise TypeError(f"{stage}/{key}: private and released must be True or False")
    if private and not released:
        raise PrivateMetricError(
            f"{stage}/{key}: a statistic of private data may reach logs only after a noisy release recorded "
            "in the ledger (docs/design.md section 2, 'Extra releases'); release it through the engine (purpose "
            "'metric') and log the noisy value with released=True, or log a public quantity instead"
        )


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a crash inside write) so appended rows start on a line of their own.

    Unlike the ledger, a lost metric row costs nothing: no release depends on it.
    """
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


class MetricsLogger:
    """The one gate between a run and its logs: checks every scalar (:func:`check_key`, the privacy rule of
    :func:`_check_provenance`, finiteness), appends it to ``metrics.jsonl`` and hands it to each sink of
    ``run.loggers`` (TensorBoard under ``tb/<stage>/`` by default; W&B, MLflow: ``launch.pipeline.loggers``).
    A sink never sees a value this class refused, so every backend receives the same public rows.

    Use as a context manager or call :meth:`close`. Opening an existing metrics.jsonl appends (resume).
    """

    def __init__(self, tb_dir: str | os.PathLike[str], jsonl_path: str | os.PathLike[str],
                 sinks: list[Any] | None = None, *, withheld_time_stages: Collection[str] = ()) -> None:
        """Args:
        tb_dir: TensorBoard's directory (used when ``sinks`` is None: TensorBoard only).
        jsonl_path: metrics.jsonl, always written (the report's plots read it).
        sinks: the backends (``launch.pipeline.loggers.make_sinks``); the logger closes them.
        withheld_time_stages: stages whose wall-clock times may not be published (the private stages, unless
            ``run.report_wall_time``): a row's time follows the private batch sizes, an unaccounted release. Their
            rows carry ``time: null`` in metrics.jsonl and the logger's start time in every backend (TensorBoard's
            walltime, MLflow's timestamp), and their TensorBoard files are opened now, so not even a file name
            dates a step; W&B stamps its own times, so those rows reach W&B only when the logger closes.
        """
        from launch.pipeline.loggers import TensorBoardSink

        self.tb_dir = Path(tb_dir)
        self.jsonl_path = Path(jsonl_path)
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.jsonl_path)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self.sinks = list(sinks) if sinks is not None else [TensorBoardSink(self.tb_dir)]
        self.started = time.time()
        self.withheld_time_stages = frozenset(withheld_time_stages)
        for sink in self.sinks:
            sink.withhold_time(self.withheld_time_stages, at=self.started)

    def _append(self, row: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self._jsonl.flush()

    def log(
        self,
        key: str,
        value: float,
        *,
        step: int,
        stage: str,
        private: bool,
        released: bool = False,
    ) -> None:
        """Log one scalar.

        Args:
            key: ``namespace/name`` (see :data:`NAMESPACES`).
            value: a finite number (a 0-d tensor is accepted and converted).
            step: the stage's step or iteration.
            stage: the TensorBoard run it goes to ("sft", "rm", "ppo", "eval", ...).
            private: whether the value was computed from private data. Required: every call site decides.
            released: the value is a noisy, ledger-accounted release (required when ``private``).

        Raises:
            PrivateMetricError: ``private`` without ``released``.
            MetricKeyError: a key outside the namespaces.
            ValueError: a non-finite value.
        """
        check_key(key)
        _check_provenance(key, stage=stage, private=private, released=released)
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{stage}/{key}: value {number} is not finite")
        withheld = stage in self.withheld_time_stages
        for sink in self.sinks:
            sink.scalar(stage, key, number, int(step))
        self._append(
            {
                "key": key,
                "value": number,
                "step": int(step),
                "stage": stage,
                "private": private,
                "released": released,
                "time": None if withheld else time.time(),
            }
        )

    def log_dict(
        self, values: dict[str, float], *, step: int, stage: str, private: bool, released: bool = False
    ) -> None:
        """:meth:`log` each item; all items share the same provenance (checked before anything is written)."""
        for key in values:
            check_key(key)
            _check_provenance(key, stage=stage, private=private, released=released)
        for key, value in values.items():
            self.log(key, value, step=step, stage=stage, private=private, released=released)

    def log_config(self, config: Any) -> None:
        """Log the full resolved config as text at the start of a run (TensorBoard text tab + metrics.jsonl)."""
        import dataclasses

        data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        text = yaml.safe_dump(data, sort_keys=False)
        for sink in self.sinks:
            sink.config(data, text)
        self._append({"type": "config", "config": data, "time": time.time()})

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()
        self._jsonl.flush()

    def close(self) -> None:
        try:
            for sink in self.sinks:
                sink.close()
        finally:
            self.sinks = []
            if not self._jsonl.closed:
                self._jsonl.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Scalar rows of a metrics.jsonl (config rows skipped; a torn last line from a crash is ignored)."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # torn tail: the process died inside write
                break
            raise ValueError(f"{path}:{number}: not a JSON line") from None
        if "key" in row:
            rows.append(row)
    return rows


def series(rows: list[dict[str, Any]], key: str, *, stage: str | None = None) -> list[tuple[int, float]]:
    """``[(step, value)]`` of one key (and stage), sorted by step; a step logged twice (resume) keeps the last."""
    by_step: dict[int, float] = {}
    for row in rows:
        if row["key"] == key and (stage is None or row["stage"] == stage):
            by_step[int(row["step"])] = float(row["value"])
    return sorted(by_step.items())

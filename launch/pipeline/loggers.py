"""Where the run's public metrics go besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow (``run.loggers``).

A sink only ever receives what :class:`launch.pipeline.metrics.MetricsLogger` let through: the privacy filter
(``private`` values only when ``released``; namespaced keys; finite numbers) lives there, in one place, before
any sink is called, so every backend gets exactly the same rows and nothing else. Sinks know nothing of privacy.

Every backend names a metric ``<stage>/<key>`` with the stage's own step (``sft/privacy/epsilon`` at SFT step
t): TensorBoard as one run per stage (``tb/<stage>/``, key ``<key>``), W&B as one run whose ``<stage>/*`` keys are
plotted against a ``<stage>/step`` axis (``define_metric``; W&B's own step must only grow, and each stage counts
from 1), MLflow as one run with ``<stage>/<key>`` at ``step``. wandb and mlflow are optional (``pip install
'dpalign[loggers]'``); asking for one that is not installed fails at start, before any privacy is spent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LOGGERS: tuple[str, ...] = ("tensorboard", "wandb", "mlflow")


class LoggerUnavailableError(RuntimeError):
    """A logger in ``run.loggers`` cannot be used (its package is missing); names the fix."""


class TensorBoardSink:
    """One TensorBoard run per stage under ``tb_dir`` (the same key of SFT, RM and PPO overlays in one chart)."""

    name = "tensorboard"

    def __init__(self, tb_dir: str | os.PathLike[str]) -> None:
        self.tb_dir = Path(tb_dir)
        self._writers: dict[str, Any] = {}
        self._withheld: frozenset[str] = frozenset()
        self._at = 0.0

    def withhold_time(self, stages: frozenset[str], *, at: float) -> None:
        """Stages whose events carry the time ``at`` instead of the clock (their files are opened now)."""
        self._withheld, self._at = frozenset(stages), at
        for stage in sorted(stages):
            self._writer(stage)

    def _writer(self, stage: str) -> Any:
        writer = self._writers.get(stage)
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter  # heavy: only when something is logged

            writer = self._writers[stage] = SummaryWriter(log_dir=str(self.tb_dir / stage))
        return writer

    def scalar(self, stage: str, key: str, value: float, step: int) -> None:
        walltime = self._at if stage in self._withheld else None
        self._writer(stage).add_scalar(key, value, global_step=step, walltime=walltime)

    def config(self, data: Mapping[str, Any], text: str) -> None:
        # Markdown code block: TensorBoard renders text summaries as markdown.
        self._writer("run").add_text("config", "```\n" + text + "```", global_step=0)

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class WandbSink:
    """One W&B run (``mode`` offline by default: files under ``RUN_DIR/wandb``, ``wandb sync`` uploads them).

    Only the gate's rows and the config: console capture, code and git capture, system metrics and host metadata
    are off."""

    name = "wandb"

    def __init__(self, *, run_dir: str | os.PathLike[str], run_id: str, project: str, mode: str) -> None:
        try:
            import wandb
        except ImportError:
            raise LoggerUnavailableError(
                "run.loggers includes wandb but wandb is not installed: pip install 'dpalign[loggers]' "
                "(or remove wandb from run.loggers)") from None
        self._wandb = wandb
        self.run = wandb.init(project=project, name=run_id, dir=str(run_dir), mode=mode, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", save_code=False, disable_code=True,
                                                      disable_git=True, x_disable_stats=True, x_disable_meta=True))
        self._stages: set[str] = set()
        self._withheld: frozenset[str] = frozenset()
        self._held: list[tuple[str, str, float, int]] = []

    def withhold_time(self, stages: frozenset[str], *, at: float) -> None:
        """W&B stamps each row with its own clock: rows of these stages are held and logged when the sink closes."""
        self._withheld = frozenset(stages)

    def scalar(self, stage: str, key: str, value: float, step: int) -> None:
        if stage in self._withheld and self.run is not None:
            self._held.append((stage, key, value, step))
            return
        self._log(stage, key, value, step)

    def _log(self, stage: str, key: str, value: float, step: int) -> None:
        if stage not in self._stages:
            self.run.define_metric(f"{stage}/step", hidden=True)
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._stages.add(stage)
        self.run.log({f"{stage}/{key}": value, f"{stage}/step": step})

    def config(self, data: Mapping[str, Any], text: str) -> None:
        self.run.config.update(dict(data), allow_val_change=True)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.run is not None:
            held, self._held = self._held, []
            for row in held:
                self._log(*row)
            self.run.finish()
            self.run = None


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in data.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, name))
        else:
            out[name] = str(v)[:6000]  # MLflow's limit on a parameter value
    return out


class MlflowSink:
    """One MLflow run in ``experiment`` at ``tracking_uri`` (default: a file store ``RUN_DIR/mlruns``, which MLflow
    3 keeps in "maintenance mode": set ``run.mlflow_tracking_uri`` to a server or ``sqlite:///...`` for the rest).

    Uses an ``MlflowClient`` of its own, never MLflow's process-global active run or tracking URI, so it neither
    reads nor changes a tracking setup of the caller's.
    """

    name = "mlflow"

    def __init__(self, *, run_dir: str | os.PathLike[str], run_id: str, tracking_uri: str, experiment: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise LoggerUnavailableError(
                "run.loggers includes mlflow but mlflow is not installed: pip install 'dpalign[loggers]' "
                "(or remove mlflow from run.loggers)") from None
        self.tracking_uri = tracking_uri or Path(run_dir, "mlruns").resolve().as_uri()
        if not tracking_uri:
            # MLflow >= 3.x refuses file stores unless asked ("maintenance mode"); ours is the run's own directory,
            # readable without a server or a database package. A configured URI (server, sqlite) is used as given.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id: str | None = self.client.create_run(exp_id, run_name=run_id).info.run_id
        self._withheld: frozenset[str] = frozenset()
        self._at = 0.0

    def withhold_time(self, stages: frozenset[str], *, at: float) -> None:
        """Rows of these stages carry the time ``at`` (the logger's start) instead of the clock."""
        self._withheld, self._at = frozenset(stages), at

    def scalar(self, stage: str, key: str, value: float, step: int) -> None:
        when = self._at if stage in self._withheld else time.time()
        self.client.log_metric(self.run_id, f"{stage}/{key}", value, timestamp=int(when * 1000), step=step)

    def config(self, data: Mapping[str, Any], text: str) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in _flatten(data).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None


def make_sinks(
    loggers: Sequence[str], *, tb_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str], run_id: str,
    wandb_project: str = "dpalign", wandb_mode: str = "offline", mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "dpalign",
) -> list[Any]:
    """The sinks named by ``run.loggers`` (any subset of :data:`LOGGERS`, in that order).

    Raises:
        LoggerUnavailableError: a requested backend's package is not installed (nothing is left open).
    """
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise ValueError(f"run.loggers: unknown logger {unknown[0]!r}; allowed: {', '.join(LOGGERS)}")
    sinks: list[Any] = []
    try:
        for name in LOGGERS:
            if name not in loggers:
                continue
            if name == "tensorboard":
                sinks.append(TensorBoardSink(tb_dir))
            elif name == "wandb":
                sinks.append(WandbSink(run_dir=run_dir, run_id=run_id, project=wandb_project, mode=wandb_mode))
            else:
                sinks.append(MlflowSink(run_dir=run_dir, run_id=run_id, tracking_uri=mlflow_tracking_uri,
                                        experiment=mlflow_experiment))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks

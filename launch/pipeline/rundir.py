"""The run directory of `dpalign run`: its layout, the resolved config, and crash-safe stage completion.

Layout::

    RUN_DIR/
      config.yaml            the resolved config that ran (launch.config.dump_yaml)
      plan.json              the privacy plan (trainers.stages.plan.PrivacyPlan): every stage's q, T, K, target, sigma
      ledger.jsonl           the privacy ledger (written only by accounting.ledger.Ledger; never touched here)
      metrics.jsonl          every logged scalar (launch.pipeline.metrics)
      tb/                    TensorBoard event files, one subdirectory per stage
      plots/                 PNG plots of report.md
      stages/<name>/         a finished stage's outputs (adapters, heads, exports)
      stages/<name>.done     the stage's done marker (JSON: time, wall seconds, summary)
      checkpoints/<name>/    a running stage's latest mid-stage checkpoint (removed once the stage is committed)
      report.json, report.md

A stage is done only when its outputs are complete. :meth:`RunDir.stage` hands out a fresh temporary directory;
when the ``with`` body returns, the files are fsync'ed, the directory is renamed to ``stages/<name>`` (atomic on
one file system), and only then is the marker written (to a temp file, fsync'ed, renamed). A crash at any point
leaves either no marker (the stage reruns from scratch; its leftovers are removed first) or a marker over complete
outputs. ``--resume RUN_DIR`` skips stages with a marker. The ledger is append-only and is never rolled back.

A stage without a marker restarts from its mid-stage checkpoint (``checkpoints/<name>/``, kept across the crash)
and, when private, at the ledger's count of its steps (``trainers.stages.learner.resume_step``), so it never takes
a recorded step again. The checkpoint directory is removed only after the marker is written; a crash between the
two leaves a done stage with a stale checkpoint, which is skipped with the stage and removed on resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launch.config import dump_yaml, to_dict

CONFIG_NAME = "config.yaml"
LEDGER_NAME = "ledger.jsonl"
PLAN_NAME = "plan.json"
METRICS_NAME = "metrics.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class RunDirError(RuntimeError):
    """A run directory cannot be created or resumed as asked; the message names the path and the fix."""


@dataclass
class StageOutput:
    """A stage in progress: write its outputs under ``path``; put JSON-able facts in ``summary``.

    Attributes:
        name: the stage name.
        path: a fresh temporary directory; it becomes ``stages/<name>`` when the stage completes.
        summary: saved in the done marker (e.g. final loss, steps, wall time), readable on resume by
            :meth:`RunDir.done_info` so a resumed run can still report a skipped stage.
    """

    name: str
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (so a rename cannot publish unwritten data)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def config_diff(saved: Any, given: Any, prefix: str = "", *, defaults: Any = None) -> list[str]:
    """Dotted differences between two plain-data configs: ``["sft.lr: saved 0.001, given 0.002", ...]``.

    ``defaults`` (the config class's defaults, same layout): a key the saved config lacks is no difference when the
    given value is its default. That is a field added to dpalign after the run was saved, and a new field's default
    keeps the old behaviour, so a run crashed under the previous version can be resumed after an upgrade.
    """
    if isinstance(saved, dict) and isinstance(given, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(given), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            default = defaults.get(key, _NO_DEFAULT) if isinstance(defaults, dict) else _NO_DEFAULT
            if key not in given:
                out.append(f"{name}: saved {saved[key]!r}, missing in the given config")
            elif key not in saved:
                if given[key] != default:
                    out.append(f"{name}: not in the saved config, given {given[key]!r}")
            else:
                out.extend(config_diff(saved[key], given[key], name,
                                       defaults=None if default is _NO_DEFAULT else default))
        return out
    if isinstance(saved, (list, tuple)) and isinstance(given, (list, tuple)):
        saved, given = list(saved), list(given)
    return [] if saved == given else [f"{prefix}: saved {saved!r}, given {given!r}"]


_NO_DEFAULT = object()


class RunDir:
    """One run's directory. Make one with :meth:`create` (new run) or :meth:`resume` (continue a run)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # ---- creating and resuming ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        config: Any,
        *,
        out_dir: str | os.PathLike[str] = "runs",
        name: str = "run",
        dir: str | os.PathLike[str] = "",
    ) -> RunDir:
        """Make a new run directory and write the resolved ``config`` (a dataclass) to config.yaml.

        The directory is ``dir`` when given (it must not exist or be empty), else ``<out_dir>/<name>-<UTC time>``
        with a numeric suffix if that exists. The run id is the directory's name.

        Raises:
            RunDirError: ``dir`` already holds a run (resume it with --resume) or other files.
        """
        if dir:
            path = Path(dir)
            if (path / CONFIG_NAME).exists():
                raise RunDirError(
                    f"{path}: already holds a run (config.yaml exists); continue it with --resume {path} or "
                    "choose another run.dir"
                )
            if path.exists() and any(path.iterdir()):
                raise RunDirError(f"{path}: exists and is not empty; choose an empty or new run.dir")
        else:
            if not _STAGE_NAME.match(name.replace("-", "_").lower()):
                raise RunDirError(f"run.name={name!r}: use letters, digits, '-' and '_' (it names a directory)")
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            base = Path(out_dir) / f"{name}-{stamp}"
            path, n = base, 0
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        (run.path / "stages").mkdir(exist_ok=True)
        run.tb_dir.mkdir(exist_ok=True)
        run.plots_dir.mkdir(exist_ok=True)
        tmp = run.path / f".{CONFIG_NAME}.tmp"
        dump_yaml(config, tmp)
        os.replace(tmp, run.config_path)
        _fsync_path(run.path)
        return run

    @classmethod
    def for_config(cls, config: Any) -> RunDir:
        """:meth:`create` from the root config's ``run`` section (``out_dir``, ``name``, ``dir``)."""
        section = config.run
        return cls.create(config, out_dir=section.out_dir, name=section.name, dir=section.dir)

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike[str],
        config: Any = None,
        *,
        ignore: Sequence[str] = ("run.dir",),
    ) -> RunDir:
        """Reopen a run directory; when ``config`` is given it must equal the saved one (except ``ignore``).

        Resuming with a different config would mix two runs in one ledger and one report, so every difference
        is listed. Nothing is written: the ledger is reopened (and appended to) by its own owner.

        Raises:
            RunDirError: no run at ``path``, or the config differs.
        """
        run = cls(path)
        if not run.config_path.is_file():
            raise RunDirError(f"{run.path}: no {CONFIG_NAME}; --resume needs a directory made by `dpalign run`")
        if config is not None:
            diffs = [
                d
                for d in config_diff(run.saved_config(), to_dict(config), defaults=_defaults_of(config))
                if not any(d.startswith(f"{key}:") or d.startswith(f"{key}.") for key in ignore)
            ]
            if diffs:
                shown = "; ".join(diffs[:10]) + (f"; and {len(diffs) - 10} more" if len(diffs) > 10 else "")
                raise RunDirError(
                    f"{run.path}: the given config differs from the saved {CONFIG_NAME} ({shown}). Resume with "
                    f"the saved config (--config {run.config_path}) or start a new run"
                )
        return run

    def saved_config(self) -> dict[str, Any]:
        """The resolved config saved at creation, as plain data."""
        data = yaml.safe_load(self.config_path.read_text())
        if not isinstance(data, dict):
            raise RunDirError(f"{self.config_path}: not a mapping of config sections")
        return data

    # ---- layout ---------------------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        """The run's id: its directory name (the ledger's run_id)."""
        return self.path.resolve().name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def ledger_path(self) -> Path:
        return self.path / LEDGER_NAME

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def report_json(self) -> Path:
        return self.path / REPORT_JSON

    @property
    def report_md(self) -> Path:
        return self.path / REPORT_MD

    @property
    def tb_dir(self) -> Path:
        return self.path / "tb"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    def stage_dir(self, name: str) -> Path:
        """Where a finished stage's outputs live (exists only once the stage is complete)."""
        return self.path / "stages" / _check_stage(name)

    def marker_path(self, name: str) -> Path:
        return self.path / "stages" / f"{_check_stage(name)}.done"

    def checkpoint_dir(self, name: str) -> Path:
        """Where a running stage keeps its latest mid-stage checkpoint (it survives a crash, for --resume)."""
        return self.path / "checkpoints" / _check_stage(name)

    def drop_checkpoint(self, name: str) -> None:
        """Remove a stage's checkpoint directory once the stage is committed (idempotent; refused before, since
        the checkpoint is the only record of a running stage's progress)."""
        if not self.is_done(name):
            raise RunDirError(f"{self.path}: stage {name!r} is not committed; its checkpoint is still needed")
        shutil.rmtree(self.checkpoint_dir(name), ignore_errors=True)

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN_NAME

    def write_plan(self, plan: dict[str, Any]) -> None:
        """Record the privacy plan the run trains under (before its first stage). A resumed run must plan the same:
        the plan follows from the config and the data, so a different one means either changed.

        Raises:
            RunDirError: the directory holds another plan.
        """
        if self.plan_path.is_file():
            held = json.loads(self.plan_path.read_text())
            if held != json.loads(json.dumps(plan)):
                raise RunDirError(
                    f"{self.path}: the privacy plan differs from the one this run started with ({PLAN_NAME}); the "
                    "config or the data changed. Start a new run directory"
                )
            return
        tmp = self.plan_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(plan, indent=2, sort_keys=True))
        _fsync_path(tmp)
        os.replace(tmp, self.plan_path)

    # ---- stage completion -----------------------------------------------------------------------------------
    def is_done(self, name: str) -> bool:
        """True when the stage's marker and its output directory both exist."""
        return self.marker_path(name).is_file() and self.stage_dir(name).is_dir()

    def done_info(self, name: str) -> dict[str, Any] | None:
        """The done marker's content (``stage``, ``finished``, ``wall_time_s``, ``summary``), or None if not done."""
        if not self.is_done(name):
            return None
        return json.loads(self.marker_path(name).read_text())

    def completed_stages(self) -> list[str]:
        """Names of the done stages, in completion order."""
        infos = []
        for marker in (self.path / "stages").glob("*.done"):
            info = self.done_info(marker.name[: -len(".done")])
            if info is not None:
                infos.append(info)
        return [i["stage"] for i in sorted(infos, key=lambda i: i["finished"])]

    @contextmanager
    def stage(self, name: str) -> Iterator[StageOutput]:
        """Run a stage's body with a fresh output directory; publish it and mark the stage done on success.

        Leftovers of an earlier crashed attempt (temp directories, an output directory without a marker) are
        removed first; its checkpoint directory is kept (the body resumes from it). If the body raises, its temp
        directory is removed and no marker is written. After the marker, the checkpoint directory is removed.

        Raises:
            RunDirError: the stage is already done (check :meth:`is_done` and skip it instead).
        """
        _check_stage(name)
        if self.is_done(name):
            raise RunDirError(f"{self.path}: stage {name!r} is already done; skip it (RunDir.is_done)")
        stages = self.path / "stages"
        stages.mkdir(exist_ok=True)
        for stale in stages.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = self.stage_dir(name)
        if final.exists():  # renamed but the marker never written: incomplete by definition
            shutil.rmtree(final)
        tmp = stages / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        out = StageOutput(name=name, path=tmp)
        start = time.monotonic()
        try:
            yield out
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        marker = {"stage": name, "finished": time.time(), "wall_time_s": time.monotonic() - start}
        try:  # serialize before publishing: a summary that is not JSON must not leave a half-done stage
            text = json.dumps({**marker, "summary": out.summary}, indent=1, allow_nan=False) + "\n"
        except (TypeError, ValueError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunDirError(f"stage {name!r}: summary is not plain JSON ({err}); store numbers and strings") from None
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_path(stages)
        out.path = final
        atomic_write_text(self.marker_path(name), text)
        self.drop_checkpoint(name)  # only now: a crash before this line leaves a stale but harmless checkpoint


def _check_stage(name: str) -> str:
    if not _STAGE_NAME.match(name):
        raise RunDirError(f"stage name {name!r}: use lowercase letters, digits and '_' (it names a directory)")
    return name


def _defaults_of(config: Any) -> dict[str, Any] | None:
    """The plain-data defaults of ``config``'s class, or None when it cannot be built without arguments."""
    try:
        return to_dict(type(config)())
    except TypeError:
        return None

"""Paths in a run config made absolute on the driver, before anything is shipped to a worker or an actor.

Why: Ray Train workers and rollout actors do not share the driver's working directory (under `ray job submit
--working-dir .` the driver itself runs in Ray's temporary copy of it), so a relative `.cache/dpalign/models/...`
that names a directory on the driver is, in a worker, a path that does not exist -- and ``from_pretrained`` then
reads it as a hub id. URIs (``s3://``, ``gs://``, ...) and hub ids are left alone: a model name is made absolute
only when it names an existing local directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RAY_WORKING_DIR_MARK = os.path.join("runtime_resources", "working_dir_files")
"""Where Ray unpacks a job's ``--working-dir`` (inside its session's temp dir); deleted when Ray is done with it."""


def _is_uri(value: str) -> bool:
    return "://" in value


def absolute(value: str, base: Path) -> str:
    """``value`` as an absolute path against ``base`` ('' and URIs unchanged)."""
    if not value or _is_uri(value) or os.path.isabs(value):
        return value
    return str((base / value).resolve())


def resolve_config_paths(cfg: Any, *, base: Path | None = None) -> Any:
    """Make every path of a RunConfig absolute (in place; returns ``cfg``): run.out_dir, run.dir, run.cache_dir,
    ray.storage_path, the data files, controller.load, and model.name_or_path when it is a local directory."""
    base = Path.cwd() if base is None else Path(base)
    run = cfg.run
    run.out_dir, run.dir, run.cache_dir = (absolute(v, base) for v in (run.out_dir, run.dir, run.cache_dir))
    cfg.ray.storage_path = absolute(cfg.ray.storage_path, base)
    data = cfg.data
    for name in ("sft_path", "rm_path", "ppo_path", "eval_path", "public_path", "public_valid_path"):
        setattr(data, name, absolute(getattr(data, name), base))
    cfg.controller.load = absolute(cfg.controller.load, base)
    model = cfg.model.name_or_path
    if model and not _is_uri(model) and (base / model).is_dir():
        cfg.model.name_or_path = absolute(model, base)
    return cfg


def inside_ray_working_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` lies in the temporary copy Ray makes of a job's ``--working-dir`` (deleted with it)."""
    return RAY_WORKING_DIR_MARK in str(Path(path).resolve())


def check_outputs_outlive_the_job(cfg: Any) -> str | None:
    """Why the run's outputs would vanish with the job (a message naming the field and the fix), else None.

    Under `ray job submit --working-dir .` the driver's working directory is Ray's temporary copy: a relative
    ``run.out_dir`` (the default ``runs``) would put the run directory, its ledger and the trained model there.
    """
    target = cfg.run.dir or cfg.run.out_dir
    if target and not _is_uri(target) and inside_ray_working_dir(target):
        field = "run.dir" if cfg.run.dir else "run.out_dir"
        return (
            f"{field} resolves to {target}, inside Ray's temporary copy of the job's working directory, which Ray "
            f"deletes after the job: the ledger and the trained model would be lost. Set {field} to an absolute "
            "path that outlives the job (shared storage on a cluster), e.g. run.out_dir=/mnt/shared/dpalign/runs"
        )
    return None

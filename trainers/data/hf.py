"""``data.source=hf``: a Hugging Face dataset (a hub id or a local dataset directory) as the task's data.

HF users have their data as a ``DatasetDict`` with their own split and column names. This module opens it with one
code path -- ``datasets.load_from_disk`` for a directory written by ``save_to_disk``, ``datasets.load_dataset``
for anything else (a hub id, or a local directory of data files) -- picks each stage's split
(``data.splits.sft=train_sft``), renames the columns to dpalign's roles (``data.columns.user_id=author``), and
validates every row with the same rules as ``source=files`` (:mod:`trainers.data.io`) BEFORE any training:
a missing split or column, an empty text or a missing/non-string user_id is a :class:`DataError` naming the
dataset, the split, the 1-based row and the fix. Nothing is guessed: a user_id column mapped by the config must
exist; a stage without a user_id column makes each row its own user (the report says so), as with files.

The validated stages are then written as JSONL into ``<cache_dir>/data/hf-<hash>/`` (keyed by the config and the
datasets' fingerprints; written to a temp directory and renamed), so every stage recipe, audit and Ray worker
reads them through the file loaders: one reader downstream, whatever the source.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpalign.config import config_hash, to_dict
from trainers.data.config import DataConfig
from trainers.data.io import (
    EVAL_COLUMNS,
    PPO_COLUMNS,
    PUBLIC_COLUMNS,
    PUBLIC_ROLES,
    RM_COLUMNS,
    SFT_COLUMNS,
    DataError,
    _check_rows,
    describe_task_files,
    write_jsonl,
)

ROLES: dict[str, tuple[tuple[str, ...], bool, str]] = {
    "sft": (SFT_COLUMNS, True, "SFT (D1)"),
    "rm": (RM_COLUMNS, True, "preference (D2)"),
    "ppo": (PPO_COLUMNS, True, "PPO prompt (D3)"),
    "eval": (EVAL_COLUMNS, False, "evaluation prompt"),
    "public_train": (PUBLIC_COLUMNS, False, "public corpus"),
    "public_valid": (PUBLIC_COLUMNS, False, "public corpus"),
    "domain_valid": (PUBLIC_COLUMNS, False, "public text of the private domain"),
}
"""Each role: (columns besides user_id, private (has users), what it is)."""


def open_dataset(cfg: DataConfig) -> Any:
    """The ``DatasetDict`` named by ``data.hf_dataset`` (and ``data.hf_name``).

    A directory written by ``save_to_disk`` opens with ``load_from_disk``; everything else (a hub id, a local
    directory of JSONL/Parquet/CSV files) with ``load_dataset``: the same call a hub id goes through.
    """
    import datasets

    datasets.disable_progress_bars()
    where = cfg.hf_dataset
    p = Path(where)
    try:
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            if cfg.hf_name:
                raise DataError(f"data.hf_dataset={where}: a save_to_disk directory has no configurations; "
                                "leave data.hf_name empty")
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset(where, cfg.hf_name or None)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets/hub raise many types; all mean "cannot open it"
        raise DataError(
            f"data.hf_dataset={where}: could not be opened ({type(err).__name__}: {err}); give a hub dataset id "
            "(with network access) or a local directory written by Dataset(Dict).save_to_disk or holding data files"
        ) from None
    if isinstance(ds, datasets.Dataset):  # a single split saved on its own
        raise DataError(f"data.hf_dataset={where}: holds one Dataset, not a DatasetDict with named splits; save a "
                        "DatasetDict({'sft': ..., 'rm': ..., 'ppo': ..., 'eval': ...}) or point data.splits at its splits")
    return ds


def _mapped_rows(ds: Any, mapping: dict[str, str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row, record with dpalign's column names) of one split."""
    source = ds.select_columns(list(mapping.values()))
    for i, record in enumerate(source, start=1):
        yield i, {role: record[col] for role, col in mapping.items()}


def _stage_rows(cfg: DataConfig, dsd: Any, role: str) -> tuple[list[dict[str, Any]], str]:
    """Validated records of ``role`` (columns renamed to dpalign's) and the split's label for messages."""
    columns, private, what = ROLES[role]
    split = getattr(cfg.splits, role)
    label = f"data.hf_dataset={cfg.hf_dataset} split '{split}'"
    if split not in dsd:
        raise DataError(f"{label}: no such split (data.splits.{role}); the dataset has splits "
                        f"{', '.join(sorted(dsd))}")
    ds = dsd[split]
    have = set(ds.column_names)
    mapping: dict[str, str] = {}
    for col in columns:
        src = cfg.columns.source(col)
        if src not in have:
            how = f"data.columns.{col}={src}" if getattr(cfg.columns, col) else f"no data.columns.{col} given"
            raise DataError(
                f"{label}: missing column '{src}' for the role '{col}' ({how}); its columns are "
                f"{', '.join(ds.column_names)}. Set data.columns.{col}=<column> ({what} data needs "
                f"{', '.join((('user_id',) if private else ()) + columns)})"
            )
        mapping[col] = src
    if private:
        src = cfg.columns.source("user_id")
        if src in have:
            mapping["user_id"] = src
        elif cfg.columns.user_id:
            raise DataError(
                f"{label}: missing column '{src}' for the role 'user_id' (data.columns.user_id={src}); its columns "
                f"are {', '.join(ds.column_names)}. Name the column that identifies the user, or unset "
                "data.columns.user_id to make each row its own user"
            )
    rows = list(_mapped_rows(ds, mapping))
    hint = ("; rows are those of the split, with columns mapped by data.columns"
            if any(getattr(cfg.columns, c) for c in mapping) else "")
    try:
        _check_rows(label, iter(rows), columns=columns, private=private, what=what)  # type: ignore[arg-type]
    except DataError as err:
        raise DataError(f"{err}{hint}") from None
    return [r for _, r in rows], label


def load_task_hf(cfg: DataConfig, *, cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Validate every stage of ``data.source=hf`` (before any training) and write them as the task's JSONL files.

    Returns:
        the keyword arguments of ``trainers.data.task.TaskData`` (paths of the validated JSONL files, counts,
        users); ``task.build_task`` makes the TaskData, so this module does not import ``task`` (no cycle).

    Raises:
        DataError: the dataset cannot be opened, a split or column is missing, or a row is malformed.
    """
    dsd = open_dataset(cfg)
    roles = [r for r in ROLES if getattr(cfg.splits, r)]
    prints = {r: getattr(dsd[getattr(cfg.splits, r)], "_fingerprint", None)
              for r in roles if getattr(cfg.splits, r) in dsd}
    key = {"hf_dataset": cfg.hf_dataset, "hf_name": cfg.hf_name, "splits": to_dict(cfg.splits),
           "columns": to_dict(cfg.columns), "fingerprints": prints}
    final = Path(cache_dir) / "data" / f"hf-{config_hash(key)}"
    files = {r: final / f"{r}.jsonl" for r in roles}
    if not (final / "manifest.json").is_file() or None in prints.values():
        # Validate everything before writing anything (an error leaves nothing behind).
        validated = {r: _stage_rows(cfg, dsd, r)[0] for r in roles}
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            for r, rows in validated.items():
                write_jsonl(tmp / f"{r}.jsonl", rows)
            (tmp / "manifest.json").write_text(json.dumps({**key, "counts": {r: len(v) for r, v in validated.items()}},
                                                          indent=1, default=str) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    paths = {r: str(files[r]) if r in files else "" for r in (*PUBLIC_ROLES, "sft", "rm", "ppo", "eval")}
    return dict(**paths, **describe_task_files(paths), root=str(final), built=False)

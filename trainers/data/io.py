"""Loading and validating stage files (JSONL or Parquet) through Hugging Face ``datasets``.

Every file is validated BEFORE any training, because a bad row found mid-run would waste privacy budget (the
ledger never rolls back). Each error is a :class:`DataError` naming the file, the 1-based data row and the fix.

Schema (the same for the embedded task and for your own data):

    ==========  ======================================  =====================================
    stage       columns                                 loader
    ==========  ======================================  =====================================
    D1 sft      user_id, prompt, response               :func:`load_sft`
    D2 rm       user_id, prompt, chosen, rejected       :func:`load_preferences`
    D3 ppo      user_id, prompt                         :func:`load_prompts`
    eval        prompt                                  :func:`load_eval_prompts`
    public      text                                    :func:`load_public`
    ==========  ======================================  =====================================

``user_id`` is a non-empty string: all records of a user are sampled and clipped together (the privacy unit). A
file with NO ``user_id`` column makes each row its own user (``StageData.per_record_users`` is then True, and the
run report says so); a ``user_id`` column with a missing or non-string value is an error, never a guess.
Text columns must be non-empty strings. Extra columns are kept and ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SFT_COLUMNS: tuple[str, ...] = ("prompt", "response")
RM_COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")
PPO_COLUMNS: tuple[str, ...] = ("prompt",)
EVAL_COLUMNS: tuple[str, ...] = ("prompt",)
PUBLIC_COLUMNS: tuple[str, ...] = ("text",)
SYNTHETIC_USER_PREFIX = "row-"
"""user_id given to row i of a file without a user_id column: ``row-<i>`` (each record is its own user)."""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class StageData:
    """One validated stage file.

    Attributes:
        rows: the records as a ``datasets.Dataset`` (always with a string ``user_id`` column for private stages).
        path: the file it came from.
        per_record_users: True if the file had no user_id column, so each row is its own user.
        num_users: distinct user ids.
    """

    rows: Any
    path: str
    per_record_users: bool
    num_users: int

    def __len__(self) -> int:
        return len(self.rows)


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise DataError(
        f"{path}: unsupported file type '{suffix}'; use .jsonl (one JSON object per line) or .parquet"
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based data row, record) of a JSONL file; blank lines are skipped and not counted."""
    row = 0
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: row {row} (line {line_no}): not valid JSON ({err.msg}); write one JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: row {row} (line {line_no}): expected a JSON object, got {record!r}")
            yield row, record


def _check_rows(
    path: Path,
    rows: Iterable[tuple[int, dict[str, Any]]],
    *,
    columns: Sequence[str],
    private: bool,
    what: str,
) -> tuple[int, bool]:
    """Validate records; returns (number of rows, whether a user_id column exists)."""
    needed = (("user_id",) if private else ()) + tuple(columns)
    has_user = None
    count = 0
    for row, record in rows:
        count += 1
        if has_user is None:
            has_user = private and "user_id" in record
        for col in columns:
            if col not in record:
                raise DataError(
                    f"{path}: row {row}: missing column '{col}'; {what} files need columns {', '.join(needed)}"
                )
            value = record[col]
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"{path}: row {row}: '{col}' is {value!r}; it must be a non-empty string "
                    "(fill it in or drop the row)"
                )
        if private:
            if ("user_id" in record) != has_user:
                raise DataError(
                    f"{path}: row {row}: "
                    + ("missing user_id" if has_user else "has a user_id but row 1 does not")
                    + "; give every row a string user_id, or drop the column to make each row its own user"
                )
            if has_user:
                uid = record["user_id"]
                if not isinstance(uid, str) or not uid.strip():
                    kind = type(uid).__name__
                    raise DataError(
                        f"{path}: row {row}: user_id is {uid!r} ({kind}); user_id must be a non-empty string "
                        '(quote numeric ids, e.g. "17")'
                    )
    if count == 0:
        raise DataError(
            f"{path}: no rows; {what} files need at least one row with columns {', '.join(needed)}"
        )
    return count, bool(has_user)


def _load(
    path: str | os.PathLike, *, columns: Sequence[str], private: bool, what: str, setting: str
) -> StageData:
    p = Path(path)
    if not str(path):
        raise DataError(f"no {what} file given; set {setting}")
    if not p.is_file():
        need = (("user_id",) if private else ()) + tuple(columns)
        raise DataError(
            f"{p}: file not found; expected a JSONL or Parquet {what} file with columns {', '.join(need)} "
            f"(check {setting})"
        )
    fmt = _format(p)
    import datasets

    datasets.disable_progress_bars()
    if fmt == "json":
        # Validate line by line first: precise row numbers, and no opaque Arrow type errors on mixed types.
        _check_rows(p, _jsonl_rows(p), columns=columns, private=private, what=what)
    try:
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
    except Exception as err:  # noqa: BLE001 - Arrow/datasets raise many types; all mean "unreadable file"
        raise DataError(f"{p}: could not be read as {fmt} ({type(err).__name__}: {err})") from None
    if fmt == "parquet":
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{p}: missing column '{missing[0]}' (columns: {', '.join(ds.column_names)}); {what} files need "
                f"{', '.join((('user_id',) if private else ()) + tuple(columns))}"
            )
        keep = list(columns) + (["user_id"] if private and "user_id" in ds.column_names else [])
        _check_rows(
            p, enumerate(ds.select_columns(keep), start=1), columns=columns, private=private, what=what
        )
    per_record = private and "user_id" not in ds.column_names
    if per_record:
        ds = ds.add_column("user_id", [f"{SYNTHETIC_USER_PREFIX}{i}" for i in range(len(ds))])
    num_users = len(set(ds["user_id"])) if private else 0
    return StageData(rows=ds, path=str(p), per_record_users=per_record, num_users=num_users)


def load_sft(path: str | os.PathLike) -> StageData:
    """D1 demonstrations: user_id, prompt, response."""
    return _load(path, columns=SFT_COLUMNS, private=True, what="SFT (D1)", setting="data.sft_path")


def load_preferences(path: str | os.PathLike) -> StageData:
    """D2 preference pairs: user_id, prompt, chosen, rejected."""
    return _load(path, columns=RM_COLUMNS, private=True, what="preference (D2)", setting="data.rm_path")


def load_prompts(path: str | os.PathLike) -> StageData:
    """D3 PPO prompts: user_id, prompt."""
    return _load(path, columns=PPO_COLUMNS, private=True, what="PPO prompt (D3)", setting="data.ppo_path")


def load_eval_prompts(path: str | os.PathLike) -> StageData:
    """Public held-out evaluation prompts: prompt (no user ids: evaluation data is not private)."""
    return _load(
        path, columns=EVAL_COLUMNS, private=False, what="evaluation prompt", setting="data.eval_path"
    )


def load_public(path: str | os.PathLike) -> StageData:
    """Public corpus: text (no user ids: it costs no privacy)."""
    return _load(
        path, columns=PUBLIC_COLUMNS, private=False, what="public corpus", setting="data.public_path"
    )


def user_ids(data: StageData | Any) -> set[str]:
    """Distinct user ids of a stage (a StageData or a Dataset with a user_id column).

    The accountant compares these sets across D1/D2/D3 to choose parallel or sequential composition.
    """
    rows = data.rows if isinstance(data, StageData) else data
    return set(rows["user_id"])


PUBLIC_ROLES = ("public_train", "public_valid", "domain_valid")
"""The optional public files of a task (column ``text``; no user ids, no privacy cost)."""


def describe_task_files(paths: dict[str, str]) -> dict[str, Any]:
    """Validate a task's stage files (``sft``, ``rm``, ``ppo``, ``eval``) and its public files that are set (a role
    of :data:`PUBLIC_ROLES` with a non-empty path), all before any training, and describe them: ``counts`` (rows
    per file), ``users`` (distinct users per stage and how many are in more than one: what decides parallel or
    sequential composition) and ``per_record_users`` (stages without a user_id column). One definition for user
    files (``data.source=files``) and Hugging Face datasets written as JSONL (``data.source=hf``).

    Raises:
        DataError: a missing file, column or malformed row.
    """
    sft, rm, ppo = load_sft(paths["sft"]), load_preferences(paths["rm"]), load_prompts(paths["ppo"])
    counts = {"sft": len(sft), "rm": len(rm), "ppo": len(ppo), "eval": len(load_eval_prompts(paths["eval"]))}
    counts.update({r: len(load_public(paths[r])) for r in PUBLIC_ROLES if paths.get(r)})
    ids = {"sft": user_ids(sft), "rm": user_ids(rm), "ppo": user_ids(ppo)}
    in_two = (ids["sft"] & ids["rm"]) | (ids["sft"] & ids["ppo"]) | (ids["rm"] & ids["ppo"])
    return {
        "counts": counts,
        "users": {**{k: len(v) for k, v in ids.items()}, "shared": len(in_two)},
        "per_record_users": tuple(name for name, d in (("sft", sft), ("rm", rm), ("ppo", ppo)) if d.per_record_users),
    }


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write records as JSONL (UTF-8, one object per line); returns the number of rows."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as fh:
        for record in rows:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n

"""A stage's mid-stage checkpoint on disk: one latest file, replaced atomically, refused when it belongs to
another stage, user set or seed.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "state.pt"


def save_checkpoint(directory: Path, state: dict[str, Any]) -> None:
    """Replace ``directory/CHECKPOINT_FILE`` with ``state`` atomically: a temp file, fsync, ``os.replace``, fsync
    of the directory. A crash at any point leaves the previous checkpoint or the new one, never a torn file, and
    only the latest is kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{CHECKPOINT_FILE}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / CHECKPOINT_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(directory: Path | None, *, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The latest checkpoint in ``directory`` (None when there is none), after removing temp files of a write
    that a crash interrupted.

    Raises:
        RuntimeError: the checkpoint was written for another stage, user set or seed (``meta`` differs): it
            cannot be this stage's state; remove the directory or start a new run.
    """
    if directory is None or not Path(directory).is_dir():
        return None
    for stale in Path(directory).glob(f".{CHECKPOINT_FILE}.tmp-*"):
        stale.unlink(missing_ok=True)
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    if state.get("meta") != meta:
        raise RuntimeError(
            f"{path}: checkpoint of {state.get('meta')}, not of this stage ({meta}); remove {directory} or start a "
            "new run directory"
        )
    return state

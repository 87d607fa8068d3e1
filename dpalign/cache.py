"""One builder per cache entry on a node: a lock held while a cache directory is built.

dpalign's caches (the embedded task's files, the pretrained base model) are built into a temporary directory and
renamed into place, so a concurrent build never leaves a half-written entry. That alone does not stop the
duplicate work: concurrent Tune trials, Ray workers or test workers on one node that need the same missing entry
would each build it (pretraining the base model takes minutes at demo scale) and all but one would throw theirs
away. ``build_lock`` makes the others wait for the first and then read its entry.

The lock is ``flock`` on a hidden file next to the entry. Where ``flock`` does not reach across machines (some
network file systems), builds on different nodes may still run side by side; the atomic rename keeps them correct.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def build_lock(entry: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive build lock of the cache directory ``entry`` (created with its parent if missing).

    A caller checks the cache again once inside: whoever held the lock before may have built the entry."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

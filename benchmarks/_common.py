"""What the benchmarks print beside their tables: the machine's load around the run, the JSON blob, and paths
that carry no machine detail.

Why: a ratio measured on a shared machine means little without the load average it was measured under, so every
benchmark records it the same way (``load_avg`` ``before``/``after`` and ``cpus`` in its JSON); and JSON committed
under ``benchmarks/results/`` must not name the machine's directories.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def repo_relative(path: str | os.PathLike[str]) -> str:
    """``path`` as committed JSON shows it: relative to the repository, or its bare name outside it."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name


class LoadAverage:
    """The 1/5/15-minute load averages at construction and at :meth:`stop`."""

    def __init__(self) -> None:
        self.before = os.getloadavg()
        self.after = self.before

    def stop(self) -> LoadAverage:
        self.after = os.getloadavg()
        return self

    def line(self) -> str:
        return (f"load average (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in self.before)} before, "
                f"{', '.join(f'{v:.1f}' for v in self.after)} after ({os.cpu_count()} CPUs)")

    def fields(self) -> dict[str, Any]:
        return {"load_avg": {"before": list(self.before), "after": list(self.after)}, "cpus": os.cpu_count()}


def emit(blob: dict[str, Any], *, as_json: bool, json_out: str | None) -> None:
    """Print the blob as one JSON line (``--json``) and/or write it indented to ``json_out`` (``--json-out``)."""
    if as_json:
        print(json.dumps(blob))
    if json_out:
        Path(json_out).write_text(json.dumps(blob, indent=1))

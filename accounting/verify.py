"""Re-check a run's reported privacy from its ledger alone (``dpalign privacy verify RUN_DIR``).

The run writes RUN_DIR/ledger.jsonl (write-ahead, docs/ledger_schema.md) and RUN_DIR/report.json whose
"privacy" object is ``Ledger.report()``. Verification re-parses the ledger, recomputes every epsilon with fresh
dp-accounting accountants, and compares. Both sides run the same deterministic computation, so a genuine report
matches to rounding; the tolerance (relative 1e-6) is only for float printing. Anything else -- an edited,
truncated or extended ledger, an edited report -- is a mismatch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accounting.ledger import LedgerError, compute_privacy, read_ledger

REL_TOL = 1e-6
LEDGER_NAME = "ledger.jsonl"
REPORT_NAME = "report.json"
_EXACT_KEYS = ("run_id", "accountant", "rdp_order", "composition", "num_events")
_FLOAT_KEYS = ("epsilon", "delta")
_STAGE_EXACT_KEYS = ("num_events", "num_users", "user_fingerprint")
_STAGE_FLOAT_KEYS = ("epsilon", "delta")


class VerifyInputError(ValueError):
    """RUN_DIR lacks a readable ledger or report (a usage error, not a mismatch)."""


@dataclass
class VerifyResult:
    """Outcome of a verification; ``ok`` is False when any reported value disagrees with the ledger.

    Attributes:
        ok: no mismatch.
        mismatches: one line per disagreeing value ("field: reported X, ledger gives Y").
        recomputed: ``compute_privacy`` of the ledger.
        reported: the report's "privacy" object.
        torn_bytes: bytes of a torn last line that was ignored (a crash mid-write; never a used release).
    """

    ok: bool
    mismatches: list[str] = field(default_factory=list)
    recomputed: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    torn_bytes: int = 0


def _close(a: Any, b: Any) -> bool:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return False
    return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=1e-12)


def load_report_privacy(run_dir: Path) -> dict[str, Any]:
    path = run_dir / REPORT_NAME
    if not path.is_file():
        raise VerifyInputError(f"{path}: no report; verify needs the run's report.json next to its ledger")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VerifyInputError(f"{path}: not valid JSON ({err})") from None
    privacy = report.get("privacy") if isinstance(report, dict) else None
    if not isinstance(privacy, dict):
        raise VerifyInputError(f'{path}: no "privacy" object (see docs/ledger_schema.md, "report.json")')
    return privacy


def verify_run(run_dir: str | Path) -> VerifyResult:
    """Recompute RUN_DIR/ledger.jsonl and compare with RUN_DIR/report.json["privacy"].

    Raises:
        VerifyInputError: missing/unreadable ledger or report, or a corrupted ledger.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VerifyInputError(f"{run_dir}: not a directory")
    try:
        contents = read_ledger(run_dir / LEDGER_NAME)
    except LedgerError as err:
        raise VerifyInputError(str(err)) from None
    reported = load_report_privacy(run_dir)
    recomputed = compute_privacy(contents)
    mismatches: list[str] = []

    def compare(prefix: str, rep: dict[str, Any], rec: dict[str, Any], exact: tuple, floats: tuple) -> None:
        for key in exact:
            if rep.get(key) != rec.get(key):
                mismatches.append(f"{prefix}{key}: reported {rep.get(key)!r}, ledger gives {rec.get(key)!r}")
        for key in floats:
            if not _close(rep.get(key), rec.get(key)):
                mismatches.append(f"{prefix}{key}: reported {rep.get(key)!r}, ledger gives {rec.get(key)!r}")

    compare("", reported, recomputed, _EXACT_KEYS, _FLOAT_KEYS)
    rep_stages = reported.get("stages") if isinstance(reported.get("stages"), dict) else {}
    rec_stages = recomputed["stages"]
    for name in sorted(set(rep_stages) | set(rec_stages)):
        if name not in rec_stages:
            mismatches.append(f"stages.{name}: in the report but not in the ledger")
        elif name not in rep_stages:
            mismatches.append(f"stages.{name}: in the ledger but not in the report")
        else:
            compare(
                f"stages.{name}.", rep_stages[name], rec_stages[name], _STAGE_EXACT_KEYS, _STAGE_FLOAT_KEYS
            )
    return VerifyResult(not mismatches, mismatches, recomputed, reported, len(contents.torn_tail))

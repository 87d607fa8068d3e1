"""The ledger file, read back: its line types and headers, the parser, and epsilon recomputed from the file alone.

This is what ``dpalign privacy verify`` and an auditor run: no state of a live ``Ledger`` is needed, only
``ledger.jsonl`` (schema in docs/ledger_schema.md). The writer and the privacy filter are ``accounting.ledger``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accounting.accountants import (
    EventRun,
    coalesce,
    epsilon,
)
from accounting.composition import COMPOSITION_MODES
from accounting.events import PrivacyEvent
from accounting.tuning import DISTRIBUTIONS, repeat_and_select_epsilon

SCHEMA_VERSION = 1
LINE_TYPES = ("run", "stage", "event", "stage_end", "resume")
STAGE_STATUSES = ("completed", "refused", "failed")
TORN_SUFFIX = ".torn"
LEDGER_COMPOSITIONS = (*COMPOSITION_MODES, "repeat_and_select")
"""A run is parallel or sequential; a repeat-and-select study ledger (``launch/study.py``) holds its trials' stages
and one ``tuning`` event whose mechanism bounds every trial (docs/ledger_schema.md, "Tuning")."""
TUNING_STAGE = "tuning"


class LedgerError(RuntimeError):
    """The ledger cannot be opened, read or written as asked; the message names the file and the fix."""


@dataclass(frozen=True)
class RunHeader:
    """First line of the ledger: the run's identity and budget.

    Attributes:
        run_id: identifier of the run (checked on resume).
        target_epsilon, target_delta: the run's overall budget.
        accountant: "pld" (fixed schedules) or "rdp" (privacy filter at ``rdp_order``).
        rdp_order: the single RDP order fixed before the run (required for "rdp", None for "pld").
        composition: "parallel" (disjoint stage user sets) or "sequential".
    """

    run_id: str
    target_epsilon: float
    target_delta: float
    accountant: str
    rdp_order: float | None
    composition: str


@dataclass(frozen=True)
class StageHeader:
    """A stage's start line: everything verify needs to recompute the stage from the file alone.

    Attributes:
        stage: stage name ("sft", "rm", "ppo", ...).
        user_fingerprint: fingerprint of the stage's user set (``composition.user_set_fingerprint``).
        num_users: N, the number of users in the stage (q * N is the expected batch size).
        target_epsilon, target_delta: the stage's budget.
        composition, accountant, rdp_order: copied from the run header, so each stage line is self-describing.
    """

    stage: str
    user_fingerprint: str
    num_users: int
    target_epsilon: float
    target_delta: float
    composition: str
    accountant: str
    rdp_order: float | None


@dataclass
class LedgerContents:
    """Everything parsed from a ledger file.

    Attributes:
        path: the file.
        run: the run header.
        stages: stage headers by name, in order of first appearance.
        events: event lines, in file order.
        stage_end: the last stage_end line of each stage ({"status", "reason"}).
        resumes: resume lines.
        torn_tail: bytes after the last newline (a torn write), b"" when the file ends cleanly.
    """

    path: Path
    run: RunHeader
    stages: dict[str, StageHeader] = field(default_factory=dict)
    events: list[PrivacyEvent] = field(default_factory=list)
    stage_end: dict[str, dict[str, str]] = field(default_factory=dict)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    torn_tail: bytes = b""
    valid_bytes: int = 0
    tuning: list[dict[str, Any]] = field(default_factory=list)


def _dumps(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def _require_keys(obj: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise LedgerError(f"{where}: missing field(s) {missing}")


def read_ledger(path: str | os.PathLike[str]) -> LedgerContents:
    """Parse a ledger file without changing it. A torn last line is reported in ``torn_tail``, not parsed.

    Raises:
        LedgerError: missing file, no run header, an unknown schema version or line type, a malformed line
            before the last one, an event of a stage that has no stage line, or a stage redefined differently.
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"{path}: no such ledger file")
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    body, tail = data[:cut], data[cut:]
    lines = body.split(b"\n")[:-1] if body else []
    contents: LedgerContents | None = None
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LedgerError(
                f"{where}: not a JSON line ({err}); the ledger is corrupted, refusing to skip it"
            ) from None
        if not isinstance(obj, dict) or obj.get("type") not in LINE_TYPES:
            raise LedgerError(f"{where}: line type must be one of {LINE_TYPES}, got {obj!r:.80}")
        kind = obj["type"]
        if contents is None:
            if kind != "run":
                raise LedgerError(f"{where}: the first line must be the run header, got type {kind!r}")
            if obj.get("schema_version") != SCHEMA_VERSION:
                raise LedgerError(
                    f"{where}: schema_version {obj.get('schema_version')!r} is not supported "
                    f"(this dpalign reads version {SCHEMA_VERSION})"
                )
            _require_keys(obj, tuple(RunHeader.__dataclass_fields__), where)
            run = RunHeader(**{k: obj[k] for k in RunHeader.__dataclass_fields__})
            contents = LedgerContents(path=path, run=run)
            continue
        if kind == "run":
            raise LedgerError(f"{where}: a second run header; one ledger belongs to one run")
        if kind == "stage":
            _require_keys(obj, tuple(StageHeader.__dataclass_fields__), where)
            header = StageHeader(**{k: obj[k] for k in StageHeader.__dataclass_fields__})
            old = contents.stages.get(header.stage)
            if old is not None and old != header:
                raise LedgerError(f"{where}: stage {header.stage!r} restarted with a different header")
            contents.stages[header.stage] = header
        elif kind == "event":
            _require_keys(
                obj, ("stage", "step", "purpose", "sampling_rate", "noise_multiplier", "repeats"), where
            )
            header = contents.stages.get(obj["stage"])
            if header is None:
                raise LedgerError(
                    f"{where}: event of stage {obj['stage']!r}, which has no stage line before it"
                )
            if obj.get("user_fingerprint", header.user_fingerprint) != header.user_fingerprint:
                raise LedgerError(f"{where}: event's user_fingerprint differs from its stage line")
            try:
                contents.events.append(PrivacyEvent.from_dict(obj))
            except (TypeError, ValueError) as err:
                raise LedgerError(f"{where}: invalid event ({err})") from None
            if obj["purpose"] == "tuning":
                contents.tuning.append(_tuning_fields(obj, where))
        elif kind == "stage_end":
            _require_keys(obj, ("stage", "status", "reason"), where)
            contents.stage_end[obj["stage"]] = {"status": obj["status"], "reason": obj["reason"]}
        else:
            contents.resumes.append(obj)
    if contents is None:
        raise LedgerError(
            f"{path}: no complete run header line; not a ledger (or torn before its first line)"
        )
    contents.torn_tail = tail
    contents.valid_bytes = cut
    return contents


def _tuning_fields(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The repeat-and-select parameters of a ``tuning`` event: how many trials on average and from which law."""
    _require_keys(obj, ("distribution", "mean_trials", "shape"), where)
    if obj["distribution"] not in DISTRIBUTIONS:
        raise LedgerError(f"{where}: tuning distribution must be one of {DISTRIBUTIONS}, got {obj['distribution']!r}")
    mean, shape = obj["mean_trials"], obj["shape"]
    if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not mean >= 1.0:
        raise LedgerError(f"{where}: tuning mean_trials must be a number >= 1, got {mean!r}")
    if obj["distribution"] == "poisson":
        shape = None
    elif isinstance(shape, bool) or not isinstance(shape, (int, float)) or not shape >= 0.0:
        raise LedgerError(f"{where}: tuning shape must be a number >= 0, got {shape!r}")
    return {"stage": obj.get("stage", TUNING_STAGE), "distribution": obj["distribution"], "mean_trials": float(mean),
            "shape": None if shape is None else float(shape)}


def _repeat_and_select(contents: LedgerContents, stages: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Epsilon of a repeat-and-select study ledger: dp-accounting's RepeatAndSelectDpEvent over the ``tuning``
    event's mechanism (the per-trial bound, fixed before any trial) at the ledger's one RDP order.

    Raises LedgerError when the ledger is not a well-formed study: not exactly one tuning event, not RDP, or a
    trial stage whose recorded RDP exceeds the bound (then the bound would not cover that trial; a stage's RDP is
    at most its trial's under either composition, so this check never rejects a sound study).
    """
    from accounting.accountants import rdp_at_order

    run = contents.run
    tuning = [e for e in contents.events if e.purpose == "tuning"]
    if len(tuning) != 1 or len(contents.tuning) != 1 or tuning[0].stage != TUNING_STAGE:
        raise LedgerError(f"{contents.path}: a repeat_and_select ledger needs exactly one tuning event in stage "
                          f"{TUNING_STAGE!r}, found {len(tuning)}")
    if run.accountant != "rdp" or run.rdp_order is None:
        raise LedgerError(f"{contents.path}: a repeat_and_select ledger must use the rdp accountant at one order")
    event, params = tuning[0], contents.tuning[0]
    order = run.rdp_order
    bound = rdp_at_order([(event, 1)], order=order)
    for name in contents.stages:
        if name == TUNING_STAGE:
            continue
        spent = rdp_at_order(_stage_runs(contents.events, name), order=order)
        if spent > bound * (1.0 + 1e-9):
            raise LedgerError(
                f"{contents.path}: trial stage {name!r} has RDP {spent:.6g} at order {order:g}, above the per-trial "
                f"bound {bound:.6g} of the tuning event: the repeat-and-select bound does not cover it"
            )
    eps = repeat_and_select_epsilon(
        trial=event.to_dp_event(), order=order, mean_trials=params["mean_trials"],
        distribution=params["distribution"], shape=params["shape"], delta=run.target_delta,
    )
    return eps, {**{k: v for k, v in params.items() if k != "stage"}, "trial_rdp_bound": bound,
                 "trial_epsilon_bound": stages[TUNING_STAGE]["epsilon"]}


def _stage_runs(events: list[PrivacyEvent], stage: str | None) -> list[EventRun]:
    return coalesce(e for e in events if stage is None or e.stage == stage)


def stage_epsilon_at(contents: LedgerContents, stage: str, *, delta: float) -> float:
    """A stage's epsilon recomputed from its events at another ``delta`` than its target (same accountant).

    Why: comparisons with papers that state their guarantee at delta = 1/N (Wu et al. 2023) need the epsilon the
    same released mechanism has at that delta; nothing is re-run and the ledger stays the only input.

    Raises:
        KeyError: the ledger has no such stage.
    """
    if stage not in contents.stages:
        raise KeyError(f"the ledger has no stage {stage!r}; stages: {sorted(contents.stages)}")
    run = contents.run
    return epsilon(
        _stage_runs(contents.events, stage), delta=delta, accountant=run.accountant, rdp_order=run.rdp_order
    ).epsilon


def compute_privacy(contents: LedgerContents) -> dict[str, Any]:
    """The privacy numbers of a ledger, recomputed from its contents alone (what report.json must contain).

    Per stage: epsilon at the stage's target delta. Overall: parallel composition takes the largest stage
    epsilon at the run's delta; sequential composition composes every event of every stage.
    """
    run = contents.run
    stages: dict[str, Any] = {}
    for name, header in contents.stages.items():
        result = epsilon(
            _stage_runs(contents.events, name),
            delta=header.target_delta,
            accountant=run.accountant,
            rdp_order=run.rdp_order,
        )
        end = contents.stage_end.get(name, {"status": "running", "reason": ""})
        stages[name] = {
            "epsilon": result.epsilon,
            "delta": header.target_delta,
            "target_epsilon": header.target_epsilon,
            "num_events": result.num_events,
            "num_users": header.num_users,
            "user_fingerprint": header.user_fingerprint,
            "status": end["status"],
            "reason": end["reason"],
        }
    tuning = None
    if run.composition == "repeat_and_select":
        overall, tuning = _repeat_and_select(contents, stages)
    elif run.composition == "parallel":
        overall = max(
            (
                epsilon(
                    _stage_runs(contents.events, name),
                    delta=run.target_delta,
                    accountant=run.accountant,
                    rdp_order=run.rdp_order,
                ).epsilon
                for name in contents.stages
            ),
            default=0.0,
        )
    else:
        overall = epsilon(
            _stage_runs(contents.events, None),
            delta=run.target_delta,
            accountant=run.accountant,
            rdp_order=run.rdp_order,
        ).epsilon
    out = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run.run_id,
        "epsilon": overall,
        "delta": run.target_delta,
        "target_epsilon": run.target_epsilon,
        "accountant": run.accountant,
        "rdp_order": run.rdp_order,
        "composition": run.composition,
        "num_events": len(contents.events),
        "stages": stages,
    }
    if tuning is not None:
        out["tuning"] = tuning
    return out

"""The write-ahead privacy ledger: one append-only ``ledger.jsonl`` per run, and the privacy filter.

Contract (docs/design.md section 2, "Ledger"; schema in docs/ledger_schema.md):
* every noisy release is one ``event`` line, written, flushed and fsync'ed BEFORE ``record`` returns, so the
  engine uses or saves a release only after it is on disk;
* nothing is ever rolled back: resuming reopens the file and appends, so a crash can over-count (a release that
  was recorded but never used), never under-count;
* a torn last line (a crash inside ``write``) belongs to a ``record`` call that never returned, so its release
  was never used; it is moved to a side file ``ledger.jsonl.torn`` for forensics, the file is cut back to its
  last complete line, and a ``resume`` line notes the repair. A malformed line that is NOT the last one is
  corruption and is refused, never skipped;
* the privacy filter ``admit(event)`` scores ledger + proposal on fresh accountants and says whether every
  stage and the run stay within budget; it never changes state. ``record`` refuses a release the filter would
  refuse.

Only the driver writes the ledger; an exclusive ``flock`` keeps a second writer out. Reading a ledger file back and
recomputing epsilon from it alone (``dpalign privacy verify``) is ``accounting.ledger_file``; its names are
re-exported here.
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accounting.accountants import (
    EventRun,
    check_accountant,
    check_delta,
    epsilon,
    mechanism_rdp,
    rdp_epsilon_at_order,
    to_dp_event,
)
from accounting.events import PrivacyEvent
from accounting.ledger_file import (  # the file format and its reader (re-exported: the ledger's public API)
    LEDGER_COMPOSITIONS,
    SCHEMA_VERSION,
    STAGE_STATUSES,
    TORN_SUFFIX,
    TUNING_STAGE,
    LedgerContents,
    LedgerError,
    RunHeader,
    StageHeader,
    _dumps,
    _stage_runs,
    _tuning_fields,
    compute_privacy,
    read_ledger,
)

_CERTIFICATE_CAP = 1 << 20


class BudgetExceededError(LedgerError):
    """``record`` was asked to log a release that the privacy filter refuses."""


@dataclass(frozen=True)
class Admission:
    """The privacy filter's answer for one proposed release; truthy when admitted.

    Attributes:
        admitted: whether the stage and the run stay within budget after the release.
        stage: the proposal's stage.
        stage_epsilon: the stage's epsilon (at its target delta) after the release; an upper bound when the
            answer came from a PLD certificate (see ``Ledger.admit``).
        overall_epsilon: the run's epsilon (at the run's delta) after the release, same caveat.
        reason: why it was refused ("" when admitted).
    """

    admitted: bool
    stage: str
    stage_epsilon: float
    overall_epsilon: float
    reason: str = ""

    def __bool__(self) -> bool:
        return self.admitted


@dataclass
class _Certificate:
    """PLD admission certificate: ``allowed`` more copies of ``event`` in ``stage`` fit the budget."""

    event: PrivacyEvent
    allowed: int
    used: int
    stage_epsilon: float
    overall_epsilon: float


class Ledger:
    """An open, writable ledger. Create or resume with :meth:`open`; close with :meth:`close` (or ``with``)."""

    def __init__(self, path: Path, fh: Any, contents: LedgerContents) -> None:
        self.path = path
        self._fh = fh
        self._contents = contents
        self._certificate: _Certificate | None = None
        # Incremental view for the filter: coalesced runs per stage and overall, and RDP sums at the filter order.
        self._runs: dict[str | None, list[EventRun]] = {}
        self._rdp: dict[str | None, float] = {}
        for event in contents.events:
            self._track(event)

    def _track(self, event: PrivacyEvent) -> None:
        for key in (event.stage, None):
            runs = self._runs.setdefault(key, [])
            if runs and runs[-1][0].same_mechanism(event):
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((event, 1))
            if self._contents.run.accountant == "rdp":
                self._rdp[key] = self._rdp.get(key, 0.0) + self._event_rdp(event)

    def _event_rdp(self, event: PrivacyEvent) -> float:
        return mechanism_rdp(
            sampling_rate=event.sampling_rate,
            composed_noise_multiplier=event.composed_noise_multiplier,
            order=self._contents.run.rdp_order,
        )

    # ---- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        run_id: str,
        target_epsilon: float,
        target_delta: float,
        accountant: str = "pld",
        composition: str = "parallel",
        rdp_order: float | None = None,
    ) -> Ledger:
        """Create ``path`` with a run header, or resume it (its header must match these arguments).

        Args:
            path: usually RUN_DIR/ledger.jsonl.
            run_id: the run's id.
            target_epsilon, target_delta: the run's overall budget.
            accountant: "pld" for schedules fixed before the run; "rdp" for adaptive ones (needs rdp_order).
            composition: "parallel" or "sequential", from ``composition.composition_mode`` over the stage data.
            rdp_order: the RDP filter order, fixed before the run (``accountants.choose_rdp_order``).

        Raises:
            ValueError: on a bad budget, accountant, composition or order.
            LedgerError: when the file belongs to another run or setup, is corrupted, or is locked by a writer.
        """
        check_accountant(accountant)
        check_delta(target_delta)
        if not (target_epsilon > 0.0) or math.isinf(target_epsilon):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
        if composition not in LEDGER_COMPOSITIONS:
            raise ValueError(f"composition must be one of {LEDGER_COMPOSITIONS}, got {composition!r}")
        if accountant == "rdp":
            if rdp_order is None or not (float(rdp_order) > 1.0) or math.isinf(rdp_order):
                raise ValueError(
                    "accountant='rdp' needs rdp_order > 1 fixed before the run "
                    "(see accounting.accountants.choose_rdp_order)"
                )
            rdp_order = float(rdp_order)
        elif rdp_order is not None:
            raise ValueError("rdp_order is only meaningful with accountant='rdp'")
        header = RunHeader(
            run_id=str(run_id),
            target_epsilon=float(target_epsilon),
            target_delta=float(target_delta),
            accountant=accountant,
            rdp_order=rdp_order,
            composition=composition,
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "ab")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise LedgerError(f"{path}: another process holds this ledger open for writing") from None
        try:
            if fh.tell() == 0:
                contents = LedgerContents(path=path, run=header)
                ledger = cls(path, fh, contents)
                ledger._append(
                    {"type": "run", "schema_version": SCHEMA_VERSION, **asdict(header), "time": _now()}
                )
                _fsync_dir(path.parent)
                return ledger
            if b"\n" not in path.read_bytes():
                # Crash while writing the run header itself: no event can exist yet. Keep the bytes, start over.
                side = path.with_name(path.name + TORN_SUFFIX)
                with open(side, "ab") as out:
                    out.write(path.read_bytes() + b"\n")
                    out.flush()
                    os.fsync(out.fileno())
                os.truncate(path, 0)
                fh.seek(0)
                ledger = cls(path, fh, LedgerContents(path=path, run=header))
                ledger._append(
                    {"type": "run", "schema_version": SCHEMA_VERSION, **asdict(header), "time": _now()}
                )
                return ledger
            contents = read_ledger(path)
            if contents.run != header:
                raise LedgerError(
                    f"{path}: belongs to a different run or setup: file has {asdict(contents.run)}, asked for "
                    f"{asdict(header)}; use a new run directory or the original settings"
                )
            ledger = cls(path, fh, contents)
            ledger._repair_torn_tail()
            return ledger
        except BaseException:
            fh.close()
            raise

    def _repair_torn_tail(self) -> None:
        tail = self._contents.torn_tail
        torn_file = ""
        if tail:
            side = self.path.with_name(self.path.name + TORN_SUFFIX)
            with open(side, "ab") as out:
                out.write(tail + b"\n")
                out.flush()
                os.fsync(out.fileno())
            os.truncate(self.path, self._contents.valid_bytes)
            self._fh.seek(0, os.SEEK_END)
            torn_file = side.name
            self._contents.torn_tail = b""
        record = {"type": "resume", "time": _now(), "torn_bytes": len(tail), "torn_file": torn_file}
        self._append(record)
        self._contents.resumes.append(record)

    # ---- writing -------------------------------------------------------------------------------------------
    def _append(self, obj: dict[str, Any]) -> None:
        """Write one line and make it durable before returning (write-ahead)."""
        line = _dumps(obj)
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._contents.valid_bytes += len(line)

    def begin_stage(
        self,
        stage: str,
        *,
        user_fingerprint: str,
        num_users: int,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
    ) -> StageHeader:
        """Write the stage's start line (or, on resume, check it matches the one already there).

        Stage targets default to the run's; under parallel composition they may not exceed it.
        """
        run = self._contents.run
        target_epsilon = run.target_epsilon if target_epsilon is None else float(target_epsilon)
        target_delta = run.target_delta if target_delta is None else float(target_delta)
        check_delta(target_delta)
        if not (target_epsilon > 0.0) or math.isinf(target_epsilon):
            raise ValueError(
                f"stage {stage!r}: target_epsilon must be a finite number > 0, got {target_epsilon}"
            )
        if target_epsilon > run.target_epsilon or target_delta > run.target_delta:
            raise ValueError(
                f"stage {stage!r}: target ({target_epsilon}, {target_delta}) exceeds the run's "
                f"({run.target_epsilon}, {run.target_delta})"
            )
        if int(num_users) != num_users or num_users < 1:
            raise ValueError(f"stage {stage!r}: num_users must be an integer >= 1, got {num_users}")
        header = StageHeader(
            stage=str(stage),
            user_fingerprint=str(user_fingerprint),
            num_users=int(num_users),
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            composition=run.composition,
            accountant=run.accountant,
            rdp_order=run.rdp_order,
        )
        old = self._contents.stages.get(header.stage)
        if old is not None:
            if old != header:
                raise LedgerError(
                    f"{self.path}: stage {stage!r} already started with {asdict(old)}; resuming it with "
                    f"different settings ({asdict(header)}) would mix two user sets or budgets"
                )
            return old
        self._append({"type": "stage", **asdict(header), "time": _now()})
        self._contents.stages[header.stage] = header
        return header

    def record(
        self, event: PrivacyEvent, *, stage_fingerprint: str | None = None, enforce: bool = True
    ) -> None:
        """Append ``event`` and fsync it; returns only once the line is durable. Use the release only after.

        Args:
            event: the release.
            stage_fingerprint: if given, must equal the stage's user fingerprint (catches a stage fed the wrong
                dataset).
            enforce: refuse (BudgetExceededError) a release the privacy filter refuses. Turn off only to record a
                release that already happened (it is then counted, and later releases are refused).

        Raises:
            LedgerError: unknown or finished stage, fingerprint mismatch.
            BudgetExceededError: the filter refuses the release (nothing is written).
        """
        header = self._stage_for(event)
        if stage_fingerprint is not None and stage_fingerprint != header.user_fingerprint:
            raise LedgerError(
                f"stage {event.stage!r}: event's user fingerprint {stage_fingerprint} differs from the stage's "
                f"{header.user_fingerprint}"
            )
        if enforce:
            admission = self.admit(event)
            if not admission:
                raise BudgetExceededError(admission.reason)
        self._append(
            {"type": "event", **event.to_dict(), "user_fingerprint": header.user_fingerprint, "time": _now()}
        )
        self._contents.events.append(event)
        self._track(event)
        cert = self._certificate
        if cert is not None:
            if cert.event.stage == event.stage and cert.event.same_mechanism(event):
                cert.used += 1
            else:
                self._certificate = None

    def record_tuning(
        self, *, trial_bound_sigma: float, distribution: str, mean_trials: float, shape: float | None
    ) -> None:
        """Append the ``tuning`` event of a repeat-and-select study: a Gaussian release whose RDP at the ledger's
        order bounds every trial, repeated a random number of times (mean ``mean_trials``) with only the best
        kept. Goes in stage ``tuning`` (begun by the caller); not filtered (the study's cost is fixed by its plan).
        """
        if self.run.composition != "repeat_and_select":
            raise LedgerError(f"{self.path}: a tuning event belongs in a repeat_and_select study ledger")
        event = PrivacyEvent(TUNING_STAGE, 0, "tuning", 1.0, float(trial_bound_sigma))
        header = self._stage_for(event)
        params = {"distribution": distribution, "mean_trials": float(mean_trials),
                  "shape": None if distribution == "poisson" else shape}
        fields = _tuning_fields(params, str(self.path))
        self._append({"type": "event", **event.to_dict(), **params, "user_fingerprint": header.user_fingerprint,
                      "time": _now()})
        self._contents.events.append(event)
        self._contents.tuning.append({**fields, "stage": TUNING_STAGE})
        self._track(event)
        self._certificate = None

    def end_stage(self, stage: str, *, status: str = "completed", reason: str = "") -> None:
        """Write the stage's end line: "completed", or "refused" (budget) / "failed" with a reason for the report."""
        if stage not in self._contents.stages:
            raise LedgerError(f"stage {stage!r} was never started in {self.path}")
        if status not in STAGE_STATUSES:
            raise ValueError(f"status must be one of {STAGE_STATUSES}, got {status!r}")
        self._append(
            {"type": "stage_end", "stage": stage, "status": status, "reason": str(reason), "time": _now()}
        )
        self._contents.stage_end[stage] = {"status": status, "reason": str(reason)}

    def close(self) -> None:
        if not self._fh.closed:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------------------------
    @property
    def run(self) -> RunHeader:
        return self._contents.run

    @property
    def stages(self) -> dict[str, StageHeader]:
        return dict(self._contents.stages)

    def events(self, stage: str | None = None) -> list[PrivacyEvent]:
        """Recorded events (of one stage, or all), in order."""
        return [e for e in self._contents.events if stage is None or e.stage == stage]

    def recorded_steps(self, stage: str) -> int:
        """How many steps of ``stage`` the ledger holds: 1 + the highest recorded step index (0 if none).

        Read-only; this is where a crashed stage resumes (``trainers.stages.learner.resume_step``). A stage records
        its steps in order from 0, one event per step, so this is also their count; it is 1 + max (not the
        number of event lines) so that a stage rerun from step 0 by an older dpalign, which recorded some step
        indices twice, still resumes after its last recorded step. Every recorded release stays counted in
        epsilon either way.
        """
        return max((e.step + 1 for e in self._contents.events if e.stage == stage), default=0)

    def __iter__(self) -> Iterator[PrivacyEvent]:
        return iter(self.events())

    def dp_event(self, stage: str | None = None) -> Any:
        """The recorded history as one dp-accounting DpEvent (e.g. the trial mechanism for tuning cost)."""
        return to_dp_event(_stage_runs(self._contents.events, stage))

    def epsilon(self, stage: str | None = None) -> float:
        """Epsilon so far: of one stage at its target delta, or of the run (see ``compute_privacy``)."""
        if stage is None:
            return self._overall_epsilon()
        header = self._contents.stages.get(stage)
        if header is None:
            raise LedgerError(f"stage {stage!r} was never started in {self.path}")
        return self._stage_epsilon(stage, header.target_delta)

    def report(self) -> dict[str, Any]:
        """The "privacy" object of report.json (docs/ledger_schema.md); ``dpalign privacy verify`` re-derives it."""
        return compute_privacy(self._contents)

    # ---- the privacy filter --------------------------------------------------------------------------------
    def admit(self, event: PrivacyEvent) -> Admission:
        """Would the stage and the run stay within budget after ``event``? Never changes the ledger.

        Scored on fresh accountants over ledger + proposal. Under RDP (adaptive schedules) this is exact and
        cheap: per-mechanism RDP at the filter order, summed. Under PLD a fixed schedule would pay a full PLD
        composition per step, so the check is made for m copies of the proposal at once, m = the stage's event
        count so far (so m doubles as the ledger grows), and an admitted check becomes a certificate: the next m
        proposals of the same mechanism in the same stage are admitted from it. By monotonicity of composition
        the yes/no answer is the same as checking each one; the epsilons returned are then upper bounds. When the
        m-copy check fails, the exact one-copy check decides and a bisection finds how many still fit, so a
        stage costs about 2 log2(steps) PLD compositions in all.
        """
        header = self._stage_for(event)
        cert = self._certificate
        if (
            cert is not None
            and cert.event.stage == event.stage
            and cert.event.same_mechanism(event)
            and cert.used + 1 <= cert.allowed
        ):
            return Admission(True, event.stage, cert.stage_epsilon, cert.overall_epsilon)
        if self.run.accountant == "rdp":
            return self._score(event, 1, header)
        m = max(1, min(_CERTIFICATE_CAP, len(self.events(event.stage))))
        bulk = self._score(event, m, header) if m > 1 else None
        if bulk:
            self._certificate = _Certificate(event, m, 0, bulk.stage_epsilon, bulk.overall_epsilon)
            return bulk
        single = self._score(event, 1, header)
        if single:
            allowed, best, refused = 1, single, m
            while refused - allowed > 1:
                mid = (allowed + refused) // 2
                trial = self._score(event, mid, header)
                if trial:
                    allowed, best = mid, trial
                else:
                    refused = mid
            self._certificate = _Certificate(event, allowed, 0, best.stage_epsilon, best.overall_epsilon)
        return single

    def _score(self, event: PrivacyEvent, copies: int, header: StageHeader) -> Admission:
        run = self.run
        stage_eps = self._epsilon_with(event.stage, header.target_delta, event, copies)
        if run.composition == "parallel":
            overall_eps = max(
                self._epsilon_with(s, run.target_delta, event if s == event.stage else None, copies)
                for s in self._contents.stages
            )
        else:
            overall_eps = self._epsilon_with(None, run.target_delta, event, copies)
        if stage_eps > header.target_epsilon:
            reason = (
                f"stage {event.stage!r} budget exhausted: epsilon would be {stage_eps:.4f} > target "
                f"{header.target_epsilon:g} at delta {header.target_delta:g} ({run.accountant})"
            )
            return Admission(False, event.stage, stage_eps, overall_eps, reason)
        if overall_eps > run.target_epsilon:
            reason = (
                f"run budget exhausted ({run.composition} composition): epsilon would be {overall_eps:.4f} > "
                f"target {run.target_epsilon:g} at delta {run.target_delta:g} ({run.accountant})"
            )
            return Admission(False, event.stage, stage_eps, overall_eps, reason)
        return Admission(True, event.stage, stage_eps, overall_eps)

    def _epsilon_with(self, key: str | None, delta: float, event: PrivacyEvent | None, copies: int) -> float:
        """Epsilon of the stage ``key`` (None: all events) plus ``copies`` of ``event``, on a fresh computation."""
        run = self.run
        if run.accountant == "rdp":
            total = self._rdp.get(key, 0.0) + (copies * self._event_rdp(event) if event is not None else 0.0)
            return rdp_epsilon_at_order(total, order=run.rdp_order, delta=delta) if total > 0 else 0.0
        runs = list(self._runs.get(key, []))
        if event is not None:
            if runs and runs[-1][0].same_mechanism(event):
                runs[-1] = (runs[-1][0], runs[-1][1] + copies)
            else:
                runs.append((event, copies))
        return epsilon(runs, delta=delta, accountant="pld").epsilon

    def _stage_for(self, event: PrivacyEvent) -> StageHeader:
        header = self._contents.stages.get(event.stage)
        if header is None:
            raise LedgerError(
                f"stage {event.stage!r} was never started in {self.path}; call begin_stage first"
            )
        if event.stage in self._contents.stage_end:
            raise LedgerError(f"stage {event.stage!r} has ended in {self.path}; it takes no more releases")
        return header

    def _stage_epsilon(self, stage: str, delta: float) -> float:
        return self._epsilon_with(stage, delta, None, 0)

    def _overall_epsilon(self) -> float:
        run = self.run
        if run.composition == "parallel":
            return max((self._stage_epsilon(s, run.target_delta) for s in self._contents.stages), default=0.0)
        return self._epsilon_with(None, run.target_delta, None, 0)


def _now() -> float:
    return round(time.time(), 3)


def _fsync_dir(directory: Path) -> None:
    """Make the new file's directory entry durable too (a fresh ledger must survive a power cut)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

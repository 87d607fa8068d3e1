"""Write-ahead ledger: crash safety with a real killed writer, torn lines, resume, the filter, verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from accounting.accountants import choose_rdp_order, schedule
from accounting.composition import user_set_fingerprint
from accounting.events import PrivacyEvent
from accounting.ledger import BudgetExceededError, Ledger, LedgerError, read_ledger
from accounting.verify import VerifyInputError, verify_run

DELTA = 1e-5
ROOT = Path(__file__).resolve().parents[2]


def ev(stage: str, step: int, sigma: float = 1.0, q: float = 0.01, repeats: int = 1) -> PrivacyEvent:
    return PrivacyEvent(
        stage=stage, step=step, purpose="gradient", sampling_rate=q, noise_multiplier=sigma, repeats=repeats
    )


def _open(path, **kw):
    args = dict(run_id="run-1", target_epsilon=8.0, target_delta=DELTA) | kw
    return Ledger.open(path, **args)


WRITER = textwrap.dedent(
    """
    import sys
    from accounting.events import PrivacyEvent
    from accounting.ledger import Ledger
    ledger = Ledger.open(sys.argv[1], run_id="run-1", target_epsilon=8.0, target_delta=1e-5,
                         accountant="rdp", rdp_order=8.0)
    ledger.begin_stage("sft", user_fingerprint="sha256:u", num_users=100)
    step = 0
    while True:
        ledger.record(PrivacyEvent(stage="sft", step=step, purpose="gradient", sampling_rate=0.001,
                                   noise_multiplier=5.0))
        print(step, flush=True)  # acknowledged only after record() returned: the release may now be used
        step += 1
    """
)


def test_killed_writer_loses_no_acknowledged_event(tmp_path):
    path = tmp_path / "ledger.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    acknowledged = -1
    deadline = time.time() + 60
    while acknowledged < 40 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acknowledged = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert acknowledged >= 40, "writer did not start"
    contents = read_ledger(path)
    steps = [e.step for e in contents.events]
    assert steps[: acknowledged + 1] == list(range(acknowledged + 1))
    # Resume appends; nothing is rolled back.
    with _open(path, accountant="rdp", rdp_order=8.0) as ledger:
        before = len(ledger.events())
        ledger.record(ev("sft", before, sigma=5.0, q=0.001))
        assert len(ledger.events()) == before + 1
    assert read_ledger(path).resumes


def test_torn_last_line_is_preserved_and_earlier_lines_kept(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with _open(path) as ledger:
        ledger.begin_stage("sft", user_fingerprint="sha256:u", num_users=100)
        for i in range(3):
            ledger.record(ev("sft", i))
    torn = b'{"type":"event","stage":"sft","step":3,"purpo'
    with open(path, "ab") as fh:
        fh.write(torn)
    assert read_ledger(path).torn_tail == torn  # reading alone changes nothing
    with _open(path) as ledger:
        assert [e.step for e in ledger.events()] == [0, 1, 2]
        ledger.record(ev("sft", 3))
    assert (tmp_path / "ledger.jsonl.torn").read_bytes() == torn + b"\n"
    contents = read_ledger(path)
    assert [e.step for e in contents.events] == [0, 1, 2, 3] and contents.torn_tail == b""
    assert contents.resumes[-1]["torn_bytes"] == len(torn)


def test_corrupted_middle_line_is_refused_not_skipped(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with _open(path) as ledger:
        ledger.begin_stage("sft", user_fingerprint="sha256:u", num_users=100)
        ledger.record(ev("sft", 0))
        ledger.record(ev("sft", 1))
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:20]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(LedgerError, match=r"ledger.jsonl:3: not a JSON line"):
        _open(path)


def test_resume_with_other_settings_or_second_writer_is_refused(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with _open(path) as ledger:
        ledger.begin_stage("sft", user_fingerprint="sha256:u", num_users=100)
        with pytest.raises(LedgerError, match="another process"):
            _open(path)
    with pytest.raises(LedgerError, match="different run"):
        _open(path, run_id="run-2")
    with _open(path) as ledger:
        assert ledger.begin_stage("sft", user_fingerprint="sha256:u", num_users=100).num_users == 100
        with pytest.raises(LedgerError, match="different settings"):
            ledger.begin_stage("sft", user_fingerprint="sha256:other", num_users=100)
        with pytest.raises(LedgerError, match="begin_stage first"):
            ledger.record(ev("rm", 0))
        with pytest.raises(LedgerError, match="fingerprint"):
            ledger.record(ev("sft", 0), stage_fingerprint="sha256:other")


def test_running_stage_is_reentered_on_resume_and_its_step_count_is_readable(tmp_path):
    """A stage that crashed while "running": reopening and begin_stage again appends no second stage line, the
    count of its recorded steps survives the reopen, and recording continues from it (in-stage resume)."""
    path = tmp_path / "ledger.jsonl"
    with _open(path) as ledger:
        ledger.begin_stage("sft", user_fingerprint="sha256:u", num_users=100)
        ledger.begin_stage("rm", user_fingerprint="sha256:v", num_users=100)
        assert ledger.recorded_steps("sft") == 0
        for step in range(3):
            ledger.record(ev("sft", step))
        ledger.record(ev("rm", 0))
        assert ledger.recorded_steps("sft") == 3 and ledger.recorded_steps("rm") == 1
        assert ledger.recorded_steps("ppo") == 0  # never started: nothing recorded
    with _open(path) as ledger:  # the crashed run resumes
        assert ledger.report()["stages"]["sft"]["status"] == "running"
        ledger.begin_stage("sft", user_fingerprint="sha256:u", num_users=100)
        assert ledger.recorded_steps("sft") == 3
        ledger.record(ev("sft", 3))
        assert ledger.recorded_steps("sft") == 4
        ledger.end_stage("sft")
        assert ledger.recorded_steps("sft") == 4  # readable after the end too
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert sum(1 for x in lines if x["type"] == "stage" and x["stage"] == "sft") == 1
    assert [x["step"] for x in lines if x["type"] == "event" and x["stage"] == "sft"] == [0, 1, 2, 3]
    # a stage rerun from 0 by an older version (step indices recorded twice) resumes after its last step
    with _open(path) as ledger:
        ledger.begin_stage("x", user_fingerprint="sha256:x", num_users=100)
        for step in (0, 1, 0, 1, 2):
            ledger.record(ev("x", step))
        assert ledger.recorded_steps("x") == 3 and len(ledger.events("x")) == 5


def test_filter_refuses_and_stage_stops_cleanly_pld(tmp_path):
    with _open(tmp_path / "ledger.jsonl", target_epsilon=1.0) as ledger:
        ledger.begin_stage("sft", user_fingerprint="sha256:u", num_users=1000)
        step = 0
        while ledger.admit(ev("sft", step, sigma=2.0, q=0.05)):
            ledger.record(ev("sft", step, sigma=2.0, q=0.05))
            step += 1
        refusal = ledger.admit(ev("sft", step, sigma=2.0, q=0.05))
        assert not refusal and "budget exhausted" in refusal.reason and refusal.stage_epsilon > 1.0
        with pytest.raises(BudgetExceededError):
            ledger.record(ev("sft", step, sigma=2.0, q=0.05))
        ledger.end_stage("sft", status="refused", reason=refusal.reason)
        report = ledger.report()
    # The filter stopped exactly at the budget, checked independently by dp-accounting's own PLD accountant with
    # no slack: the admitted releases fit the target and one more would exceed it (measured 0.9944 vs 1.0004).
    def direct(count: int) -> float:
        acc = PLDAccountant()
        acc.compose(dp_accounting.SelfComposedDpEvent(ev("sft", 0, sigma=2.0, q=0.05).to_dp_event(), count))
        return acc.get_epsilon(DELTA)

    assert direct(step) <= 1.0 < direct(step + 1) and report["epsilon"] <= 1.0
    assert report["stages"]["sft"]["status"] == "refused" and "budget" in report["stages"]["sft"]["reason"]
    assert step > 10


def test_rdp_filter_with_adaptive_sigma_and_sequential_composition(tmp_path):
    order = choose_rdp_order(schedule(noise_multiplier=1.0, sampling_rate=0.02, steps=400), delta=DELTA)
    ledger = _open(
        tmp_path / "ledger.jsonl",
        target_epsilon=3.0,
        accountant="rdp",
        rdp_order=order,
        composition="sequential",
    )
    ledger.begin_stage("sft", user_fingerprint="sha256:a", num_users=500, target_epsilon=2.0)
    ledger.begin_stage("rm", user_fingerprint="sha256:a", num_users=500, target_epsilon=2.0)
    sigmas = [1.0 + 0.1 * (i % 7) for i in range(300)]
    for i, s in enumerate(sigmas):
        stage = "sft" if i < 150 else "rm"
        if not ledger.admit(ev(stage, i, sigma=s, q=0.02)):
            break
        ledger.record(ev(stage, i, sigma=s, q=0.02))
    recorded = ledger.events()
    # Overall = all events composed at the filter order, via dp-accounting directly.
    acc = RdpAccountant(orders=[order])
    for e in recorded:
        acc.compose(e.to_dp_event())
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert ledger.epsilon() <= 3.0 and ledger.epsilon("sft") <= 2.0
    assert ledger.epsilon() > max(ledger.epsilon("sft"), ledger.epsilon("rm"))
    ledger.close()


def test_parallel_overall_is_max_of_stages(tmp_path):
    with _open(tmp_path / "ledger.jsonl") as ledger:
        ledger.begin_stage("sft", user_fingerprint=user_set_fingerprint(["a"]), num_users=100)
        ledger.begin_stage("rm", user_fingerprint=user_set_fingerprint(["b"]), num_users=100)
        for i in range(50):
            ledger.record(ev("sft", i))
        for i in range(20):
            ledger.record(ev("rm", i, sigma=0.8))
        assert ledger.epsilon() == pytest.approx(max(ledger.epsilon("sft"), ledger.epsilon("rm")))


def _make_run(run_dir: Path) -> None:
    with _open(run_dir / "ledger.jsonl") as ledger:
        ledger.begin_stage("sft", user_fingerprint="sha256:a", num_users=300)
        ledger.begin_stage("ppo", user_fingerprint="sha256:b", num_users=300)
        for i in range(40):
            ledger.record(ev("sft", i, sigma=1.0 + 0.05 * (i // 10)))
        for i in range(30):
            ledger.record(ev("ppo", i, sigma=1.2, repeats=2))
        ledger.end_stage("sft")
        (run_dir / "report.json").write_text(json.dumps({"privacy": ledger.report(), "other": 1}))


def test_verify_equals_report_and_catches_tampering(tmp_path):
    _make_run(tmp_path)
    assert verify_run(tmp_path).ok
    good = (tmp_path / "ledger.jsonl").read_text().splitlines(keepends=True)

    # A deleted release.
    (tmp_path / "ledger.jsonl").write_text("".join(good[:5] + good[6:]))
    bad = verify_run(tmp_path)
    assert not bad.ok and any(m.startswith("epsilon") or "num_events" in m for m in bad.mismatches)

    # One release's noise edited upwards.
    lines = list(good)
    obj = json.loads(lines[-3])
    obj["noise_multiplier"] = 3.0
    lines[-3] = json.dumps(obj) + "\n"
    (tmp_path / "ledger.jsonl").write_text("".join(lines))
    assert not verify_run(tmp_path).ok

    # An edited report.
    (tmp_path / "ledger.jsonl").write_text("".join(good))
    report = json.loads((tmp_path / "report.json").read_text())
    report["privacy"]["stages"]["ppo"]["epsilon"] *= 0.99
    (tmp_path / "report.json").write_text(json.dumps(report))
    res = verify_run(tmp_path)
    assert not res.ok and res.mismatches == [
        f"stages.ppo.epsilon: reported {report['privacy']['stages']['ppo']['epsilon']!r}, "
        f"ledger gives {res.recomputed['stages']['ppo']['epsilon']!r}"
    ]


def test_verify_input_errors(tmp_path):
    with pytest.raises(VerifyInputError, match="not a directory"):
        verify_run(tmp_path / "missing")
    with pytest.raises(VerifyInputError, match="no such ledger"):
        verify_run(tmp_path)
    _make_run(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(VerifyInputError, match='no "privacy" object'):
        verify_run(tmp_path)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_stage_target_below_run_target_refuses_at_the_stage_target(tmp_path, accountant):
    """A stage's own (epsilon, delta) bounds it, not the run's: no slack above the stage target."""
    order = choose_rdp_order(schedule(noise_multiplier=2.0, sampling_rate=0.05, steps=200), delta=DELTA)
    kw = {"accountant": accountant, **({"rdp_order": order} if accountant == "rdp" else {})}
    with _open(tmp_path / "ledger.jsonl", target_epsilon=4.0, **kw) as ledger:
        ledger.begin_stage("sft", user_fingerprint="sha256:u", num_users=1000, target_epsilon=1.0)
        step = 0
        while ledger.admit(ev("sft", step, sigma=2.0, q=0.05)):
            ledger.record(ev("sft", step, sigma=2.0, q=0.05))
            step += 1
        refusal = ledger.admit(ev("sft", step, sigma=2.0, q=0.05))
        assert step > 5 and "stage 'sft' budget exhausted" in refusal.reason
        assert ledger.epsilon("sft") <= 1.0 < refusal.stage_epsilon
        assert ledger.epsilon() <= 1.0  # the run is far from its own 4.0


def test_sequential_run_budget_alone_refuses_a_stage_within_its_own_target(tmp_path):
    """Sequential composition: the run's epsilon composes every stage; it refuses a stage that its own target
    would still admit, and the run never ends above its target (no slack)."""
    order = choose_rdp_order(schedule(noise_multiplier=1.0, sampling_rate=0.02, steps=600), delta=DELTA)
    with _open(tmp_path / "ledger.jsonl", target_epsilon=3.0, accountant="rdp", rdp_order=order,
               composition="sequential") as ledger:
        ledger.begin_stage("sft", user_fingerprint="sha256:a", num_users=500, target_epsilon=2.5)
        ledger.begin_stage("rm", user_fingerprint="sha256:a", num_users=500, target_epsilon=2.5)
        for stage in ("sft", "rm"):
            step = 0
            while ledger.admit(ev(stage, step, sigma=1.0, q=0.02)):
                ledger.record(ev(stage, step, sigma=1.0, q=0.02))
                step += 1
        refusal = ledger.admit(ev("rm", step, sigma=1.0, q=0.02))
        assert "run budget exhausted (sequential composition)" in refusal.reason
        assert step > 3 and refusal.stage_epsilon < 2.5 and ledger.epsilon("sft") <= 2.5  # rm alone would go on
        assert ledger.epsilon() <= 3.0 < refusal.overall_epsilon

"""The docs/ledger_schema.md recompute snippet, run as written against a real ledger, agrees with the report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from accounting.events import PrivacyEvent
from accounting.ledger import SCHEMA_VERSION, Ledger

DOC = Path(__file__).resolve().parents[2] / "docs" / "ledger_schema.md"


def _snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def _write(path: Path, **kw) -> dict:
    with Ledger.open(path, run_id="doc", target_epsilon=6.0, target_delta=1e-5, **kw) as ledger:
        ledger.begin_stage("sft", user_fingerprint="sha256:a", num_users=400)
        ledger.begin_stage("ppo", user_fingerprint="sha256:b", num_users=400, target_delta=5e-6)
        for i in range(30):
            ledger.record(
                PrivacyEvent(
                    stage="sft",
                    step=i,
                    purpose="gradient",
                    sampling_rate=0.03,
                    noise_multiplier=1.0 if i < 20 else 1.2,
                )
            )
        for i in range(10):
            ledger.record(
                PrivacyEvent(
                    stage="ppo",
                    step=i,
                    purpose="gradient",
                    sampling_rate=0.05,
                    noise_multiplier=1.5,
                    repeats=2,
                )
            )
        ledger.record(
            PrivacyEvent(stage="ppo", step=10, purpose="metric", sampling_rate=1.0, noise_multiplier=20.0)
        )
        report = ledger.report()
    with open(path, "ab") as fh:
        fh.write(b'{"type":"event","stage":"ppo"')  # a torn tail the snippet must ignore
    return report


@pytest.mark.parametrize(
    "kw,rel",
    [
        (dict(), 0.01),
        (dict(accountant="rdp", rdp_order=8.0, composition="sequential"), 1e-9),
    ],
)
def test_doc_snippet_recomputes_report(tmp_path, kw, rel, capsys):
    report = _write(tmp_path / "ledger.jsonl", **kw)
    scope = {"LEDGER_PATH": str(tmp_path / "ledger.jsonl")}
    exec(compile(_snippet(), str(DOC), "exec"), scope)
    assert scope["overall"] == pytest.approx(report["epsilon"], rel=rel)
    for name, stage in report["stages"].items():
        assert scope["stage_epsilon"][name] == pytest.approx(stage["epsilon"], rel=rel)
    assert "epsilon =" in capsys.readouterr().out


def test_doc_names_current_schema_version():
    assert f"(version {SCHEMA_VERSION})" in DOC.read_text()

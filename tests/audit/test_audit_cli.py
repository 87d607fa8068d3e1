"""`dpalign audit --kind one-run`: writes audit.json and audit.png, prints JSON, refuses bad config values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main


def test_audit_one_run_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "audit"
    rc = main(["audit", "--kind", "one-run", "--out", str(out), "--json", "num_canaries=300", "seed=3"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "audit.json").read_text())
    assert printed == saved
    assert saved["config"]["num_canaries"] == 300 and saved["audit"]["num_canaries"] == 300
    assert saved["flagged"] is False and saved["verdict"].startswith("consistent")
    assert saved["claimed"]["epsilon"] == pytest.approx(1.06, abs=0.02)  # sigma=4, q=1, one step, delta=1e-6
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audit_bad_value_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["audit", "--out", str(tmp_path), "confidence=1.5"])
    assert exc.value.code == 2
    assert "confidence" in capsys.readouterr().err

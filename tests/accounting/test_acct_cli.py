"""`dpalign privacy`: agreement with dp-accounting, JSON output, verify exit codes, every usage error (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from accounting.events import PrivacyEvent
from accounting.ledger import Ledger
from launch.cli import main

ROOT = Path(__file__).resolve().parents[2]
EPS = ["privacy", "epsilon", "--noise-multiplier", "1.1", "--sampling-rate", "0.01", "--steps", "10000"]
SIG = ["privacy", "sigma", "--target-epsilon", "4", "--sampling-rate", "0.01", "--steps", "10000"]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_epsilon_json_agrees_with_dp_accounting(capsys):
    code, out, err = run(EPS + ["--delta", "1e-5", "--json"], capsys)
    assert code == 0 and err == ""
    payload = json.loads(out)
    assert {"epsilon", "delta", "noise_multiplier", "accountant"} <= payload.keys()
    ref = PLDAccountant().compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 10000
        )
    )
    assert payload["epsilon"] == pytest.approx(ref.get_epsilon(1e-5), rel=0.01)
    assert payload["accountant"] == "pld" and payload["noise_multiplier"] == 1.1


def test_epsilon_human_line_names_accountant(capsys):
    code, out, _ = run(EPS + ["--delta", "1e-5", "--accountant", "rdp", "--repeats", "2"], capsys)
    assert code == 0 and out.count("\n") == 1 and "rdp accountant" in out and "K = 2" in out


def test_sigma_never_overshoots(capsys):
    code, out, _ = run(SIG + ["--delta", "1e-5", "--json", "--accountant", "rdp"], capsys)
    payload = json.loads(out)
    assert code == 0 and payload["epsilon"] <= 4.0 and payload["accountant"] == "rdp"
    code, out, _ = run(
        [*EPS[:2], "--noise-multiplier", str(payload["noise_multiplier"]), *EPS[4:]]
        + ["--delta", "1e-5", "--json", "--accountant", "rdp"],
        capsys,
    )
    assert json.loads(out)["epsilon"] <= 4.0


def test_delta_warning_for_known_dataset_size(capsys):
    code, _, err = run(EPS + ["--delta", "1e-3", "--num-users", "1000"], capsys)
    assert code == 0 and "warning: delta 0.001 is not well below 1/N" in err
    code, _, err = run(EPS + ["--delta", "1e-5", "--num-users", "1000"], capsys)
    assert code == 0 and err == ""


BAD = [
    (EPS + ["--delta", "1e-5", "--sampling-rate", "0"], "--sampling-rate must be in (0, 1]"),
    (EPS + ["--delta", "1e-5", "--sampling-rate", "1.5"], "--sampling-rate must be in (0, 1]"),
    (["privacy", "epsilon", "--noise-multiplier", "0", *EPS[4:], "--delta", "1e-5"], "--noise-multiplier"),
    (["privacy", "epsilon", "--noise-multiplier", "-1", *EPS[4:], "--delta", "1e-5"], "--noise-multiplier"),
    (EPS + ["--delta", "0"], "--delta must be in (0, 1)"),
    (EPS + ["--delta", "1"], "--delta must be in (0, 1)"),
    (EPS + ["--delta", "1e-5", "--steps", "0"], "--steps must be >= 1"),
    (EPS + ["--delta", "1e-5", "--repeats", "0"], "--repeats must be >= 1"),
    (SIG + ["--delta", "1e-5", "--target-epsilon", "0"], "--target-epsilon must be"),
    (SIG + ["--delta", "1e-5", "--target-epsilon", "-2"], "--target-epsilon must be"),
    (
        SIG
        + [
            "--delta",
            "1e-5",
            "--target-epsilon",
            "0.01",
            "--sampling-rate",
            "1",
            "--max-noise-multiplier",
            "3",
        ],
        "even noise multiplier 3 gives epsilon",
    ),
    (["privacy"], "choose an action"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_usage_errors_are_one_line_and_exit_2(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("argv", [EPS, ["privacy", "epsilon", "--noise-multiplier", "x"]])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def _run_dir(tmp_path: Path) -> Path:
    with Ledger.open(tmp_path / "ledger.jsonl", run_id="r", target_epsilon=2.0, target_delta=1e-5) as ledger:
        ledger.begin_stage("rm", user_fingerprint="sha256:a", num_users=200)
        for i in range(25):
            ledger.record(
                PrivacyEvent(stage="rm", step=i, purpose="gradient", sampling_rate=0.05, noise_multiplier=2.0)
            )
        (tmp_path / "report.json").write_text(json.dumps({"privacy": ledger.report()}))
    return tmp_path


def test_verify_ok_mismatch_and_input_errors(tmp_path, capsys):
    run_dir = _run_dir(tmp_path)
    code, out, _ = run(["privacy", "verify", str(run_dir)], capsys)
    assert code == 0 and out.startswith("OK:") and "pld accountant" in out
    ledger = run_dir / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(lines[:-1]))  # drop the last release
    code, out, _ = run(["privacy", "verify", str(run_dir), "--json"], capsys)
    payload = json.loads(out)
    assert code == 1 and payload["ok"] is False and payload["epsilon"] < payload["reported_epsilon"]
    code, _, err = run(["privacy", "verify", str(run_dir / "nope")], capsys)
    assert code == 2 and "not a directory" in err and err.count("\n") == 1
    (run_dir / "report.json").write_text("{not json")
    code, _, err = run(["privacy", "verify", str(run_dir)], capsys)
    assert code == 2 and "report.json: not valid JSON" in err


def test_console_subprocess_round_trip():
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", *EPS, "--delta", "1e-5", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0 and json.loads(out.stdout)["accountant"] == "pld"
    bad = subprocess.run(
        [sys.executable, "-m", "launch.cli", *EPS, "--delta", "2"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0

"""`dpalign tune`: the study's accounting and its refusals (fast), and a real Ray Tune study end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import dp_accounting
import pytest
import yaml
from dp_accounting.pld import PLDAccountant

from accounting.events import PrivacyEvent
from accounting.ledger import Ledger, read_ledger
from accounting.verify import verify_run
from launch.cli import main
from launch.config import ConfigError, load_config
from launch.schema import RunConfig
from launch.study import StudyConfig, check_study, compose_ledger

REPO = Path(__file__).resolve().parents[2]
TUNE_TINY = str(REPO / "launch" / "configs" / "tune-tiny.yaml")


def _trial(root: Path, name: str, sigma: float) -> Path:
    run = root / name
    run.mkdir()
    with Ledger.open(run / "ledger.jsonl", run_id=name, target_epsilon=4.0, target_delta=1e-4) as ledger:
        for stage, q in (("sft", 0.1), ("rm", 0.2)):
            ledger.begin_stage(stage, user_fingerprint=f"sha256:{stage}", num_users=100)
            for step in range(5):
                ledger.record(PrivacyEvent(stage, step, "gradient", q, sigma))
            ledger.end_stage(stage)
    return run


def test_compose_ledger_is_the_composition_of_every_trial_event(tmp_path):
    trials = [_trial(tmp_path, "a", 1.0), _trial(tmp_path, "b", 1.5)]
    study = tmp_path / "study"
    study.mkdir()
    privacy = compose_ledger(trials, study / "ledger.jsonl", run_id="study")
    events = [e for d in trials for e in read_ledger(d / "ledger.jsonl").events]
    assert privacy["num_events"] == len(events) == 20 and privacy["composition"] == "sequential"
    acc = PLDAccountant()
    # every event of every trial, composed (the study publishes all of them); equal mechanisms are composed as one
    # count, which dp-accounting self-composes: the same epsilon (to 1e-8) in a fifth of the time
    for (q, sigma), count in Counter((e.sampling_rate, e.noise_multiplier) for e in events).items():
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count)
    assert privacy["delta"] == pytest.approx(2e-4)
    assert privacy["epsilon"] == pytest.approx(acc.get_epsilon(2e-4), rel=0.02)
    (study / "report.json").write_text(json.dumps({"privacy": privacy}))
    assert verify_run(study).ok  # `dpalign privacy verify STUDY_DIR`


def test_unknown_search_field_and_adaptive_trials_under_compose_are_refused_before_any_trial():
    bad = load_config(StudyConfig, TUNE_TINY, ["study.space={sft.no_such_field: {choice: [1, 2]}}"])
    with pytest.raises(ConfigError, match="study.space.sft.no_such_field"):
        check_study(bad)
    adaptive = load_config(StudyConfig, TUNE_TINY, [
        "study.mode=compose", "study.base_overrides=[engine.policy=adaptive, privacy.accountant=rdp]"])
    with pytest.raises(ConfigError, match="study.mode=compose"):
        check_study(adaptive)


def test_tune_cli_help_config_and_config_errors_exit_2(capsys):
    assert main(["tune", "--help-config"]) == 0
    assert "study.mode" in capsys.readouterr().out
    assert main(["tune", "--config", TUNE_TINY, "study.num_samples=0"]) == 2
    assert "study.num_samples" in capsys.readouterr().err


@pytest.mark.slow  # ~90 s: 6 public-proxy trials under Ray Tune and the final private run
@pytest.mark.timeout(900)
def test_public_proxy_study_runs_chooses_and_its_ledger_is_the_final_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "tune", "--config", TUNE_TINY,
                           f"study.dir={tmp_path / 'study'}", "--json"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    study = Path(summary["study_dir"])
    rows = [json.loads(line) for line in (study / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["status"] == "completed" for r in rows)
    for r in rows:  # every trial saw the public proxy population, never the private data
        assert yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())["data"]["seed"] == 1001
    final = study / "final"
    assert (study / "ledger.jsonl").read_bytes() == (final / "ledger.jsonl").read_bytes()  # no other private event
    assert verify_run(study).ok and verify_run(final).ok
    best = load_config(RunConfig, str(study / "best.yaml"))
    assert best.data.seed == 0  # the chosen configuration, on the private data
    assert summary["best_rm_accuracy"] == max(r["rm_accuracy"] for r in rows)

"""`dpalign audit --run / --stage`: argument errors are clean; end to end on a tiny finished run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "launch" / "configs" / "tiny.yaml")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["audit", "--kind", "exposure"], "needs --run"),
        (["audit", "--kind", "mia", "--stage", "sft", "--run", "x"], "--stage is for --kind one-run"),
        (["audit", "--kind", "one-run", "--stage", "sft"], "exactly one of --config"),
        (["audit", "--kind", "one-run", "--run", "somewhere"], "needs --stage"),
    ],
)
def test_bad_arguments_fail_with_a_clear_message(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_run_without_config_is_refused(tmp_path: Path, capsys) -> None:
    assert main(["audit", "--run", str(tmp_path), "--kind", "mia"]) == 2
    assert "no config.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_exposure_and_mia_on_a_finished_tiny_run(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    fast = ["sft.expected_batch_users=6", "rm.expected_batch_users=6", "rm.gold_pairs=8", "ppo.iterations=2",
            "ppo.expected_users_per_iteration=4", "ppo.max_new_tokens=6", "ppo.rollout_actors=0", "eval.prompts=4",
            "eval.max_new_tokens=6", "eval.perplexity_records=4"]
    assert main(["run", "--config", TINY, f"run.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}", *fast,
                 "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert main(["audit", "--run", str(run_dir), "--kind", "exposure", "--candidates", "200", "--json"]) == 0
    exposure = json.loads(capsys.readouterr().out)
    assert len(exposure["canaries"]) == 2 and 0 < exposure["claimed"]["epsilon"] <= 4.0
    assert all(0.0 <= c["sft"]["exposure"] <= exposure["max_measurable_bits"] for c in exposure["canaries"])
    assert main(["audit", "--run", str(run_dir), "--kind", "mia", "--json"]) == 0
    mia = json.loads(capsys.readouterr().out)
    assert set(mia["stages"]) == {"sft", "rm"} and mia["flagged"] is False
    doc = json.loads((run_dir / "audit.json").read_text())
    assert set(doc["audits"]) == {"exposure", "mia"} and doc["verdict"].startswith("consistent")
    assert (run_dir / "audit.png").read_bytes()[:4] == b"\x89PNG"

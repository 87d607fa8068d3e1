"""`dpalign controller pretrain|show` end to end (in-process, tiny settings, SB3 trainer)."""

from __future__ import annotations

import json

import pytest

from launch.cli import main


def test_pretrain_sb3_writes_artifact_and_show_reads_it(tmp_path, capsys, monkeypatch):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where SB3's default logger would make SB3-<time>/
    out = tmp_path / "art"
    rc = main(
        [
            "controller",
            "pretrain",
            "controller.pretrain_trainer=sb3",
            "controller.pretrain_iterations=2",
            "controller.hidden=[8, 8]",
            "controller.batch_size=4",
            "controller.learning_starts=1",
            "controller.env.steps=6",
            "controller.env.interval=3",
            "controller.env.base_pretrain_steps=2",
            "controller.env.train_texts=32",
            "controller.env.valid_texts=4",
            "controller.env.reward=gain_per_budget",
            f"controller.out={out}",
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iterations"] == 2 and summary["trainer"] == "sb3"
    assert main(["controller", "show", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["provenance"]["trainer"] == "sb3" and shown["has_sb3_state"]
    assert shown["provenance"]["reward"] == "gain_per_budget"  # what it learned from, as pretrained
    assert shown["actor_hidden"] == [8, 8]
    left = [p.name for p in scratch.iterdir() if p.name.startswith("SB3-")]  # (torch's inductor cache may appear)
    assert left == [], f"SAC training left {left} behind"


def test_frozen_without_artifact_is_a_config_error(capsys):
    with pytest.raises(SystemExit) as err:
        main(["controller", "pretrain", "controller.mode=frozen"])
    assert err.value.code == 2
    assert "controller.load" in capsys.readouterr().err


def test_pretrain_refuses_per_group_granularity_and_show_refuses_a_non_artifact(tmp_path, capsys):
    assert main(["controller", "pretrain", "controller.granularity=lora_param"]) == 2
    err = capsys.readouterr().err
    assert "controller.granularity=bucket" in err and "RUN_DIR/controller" in err
    assert main(["controller", "show", str(tmp_path)]) == 2
    assert "artifact.json" in capsys.readouterr().err

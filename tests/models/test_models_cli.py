"""CLI smoke test: `dpalign pretrain` on a tiny config builds, then reuses, the tokenizer and base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main

REPO = Path(__file__).resolve().parents[2]
# tiny.yaml's own model (100 steps, beats the unigram); one thread: CI's 2 cores are shared with pytest itself.
TINY_MODEL = ["model.threads=1"]


def _config_args() -> list[str]:
    return ["--config", str(REPO / "launch" / "configs" / "tiny.yaml")]


def test_pretrain_builds_then_reuses(tmp_path, capsys):
    pytest.importorskip(
        "trainers.data.task", reason="the data build (trainers/data/task.py) is not in this checkout"
    )
    argv = ["pretrain", *_config_args(), f"run.cache_dir={tmp_path}", *TINY_MODEL, "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["built"] and first["steps"] == 100 and first["ppl"] < first["unigram_ppl"]
    model_dir = Path(first["model_dir"])
    assert model_dir.parent == tmp_path / "models" and (model_dir / "config.json").is_file()

    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not second["built"] and second["model_dir"] == first["model_dir"] and second["ppl"] == first["ppl"]

    assert main(["pretrain", *_config_args(), f"run.cache_dir={tmp_path}", *TINY_MODEL]) == 0
    text = capsys.readouterr().out
    assert (
        "reused from the cache" in text
        and "vs unigram" in text
        and "s CPU" in text
        and str(model_dir) in text
    )


def test_pretrain_config_errors_name_the_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "model.n_head=3"])
    assert exit_info.value.code == 2
    assert "model.n_head: must divide model.n_embd" in capsys.readouterr().err

"""RunDir: layout, atomic stage completion, resume skips done stages, config mismatch explained, ledger untouched."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from launch.pipeline.rundir import RunDir, RunDirError, config_diff


@dataclass
class _Sec:
    lr: float = 0.1
    layers: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class _Run:
    name: str = "t"
    out_dir: str = "runs"
    dir: str = ""


@dataclass
class _Cfg:
    run: _Run = field(default_factory=_Run)
    sft: _Sec = field(default_factory=_Sec)


def _pipeline(run: RunDir, crash_in: str | None = None) -> list[str]:
    """A toy three-stage pipeline that skips done stages; returns the stages it actually ran."""
    ran = []
    for name in ("sft", "rm", "ppo"):
        if run.is_done(name):
            continue
        with run.stage(name) as out:
            (out.path / "adapter.bin").write_bytes(b"w" * 10)
            ran.append(name)
            if name == crash_in:
                raise RuntimeError("boom")
            out.summary["steps"] = 3
    return ran


def test_layout_and_config_written(tmp_path):
    run = RunDir.create(_Cfg(), out_dir=tmp_path, name="demo")
    assert run.path.parent == tmp_path and run.path.name.startswith("demo-")
    assert run.config_path.is_file() and run.tb_dir.is_dir() and run.plots_dir.is_dir()
    assert run.saved_config()["sft"] == {"lr": 0.1, "layers": [1, 2]}
    assert run.ledger_path.name == "ledger.jsonl" and run.report_json.name == "report.json"
    second = RunDir.create(_Cfg(), out_dir=tmp_path, name="demo")  # same second: a numeric suffix
    assert second.path != run.path


def test_resume_skips_done_stages_and_never_touches_the_ledger(tmp_path):
    run = RunDir.create(_Cfg(), dir=tmp_path / "r")
    run.ledger_path.write_text('{"type":"run"}\n')
    with pytest.raises(RuntimeError, match="boom"):
        _pipeline(run, crash_in="rm")
    assert run.is_done("sft") and not run.is_done("rm")
    assert not list((run.path / "stages").glob(".rm.tmp-*"))  # failed attempt cleaned up
    ledger_before = run.ledger_path.read_bytes()

    resumed = RunDir.resume(run.path, _Cfg())
    assert _pipeline(resumed) == ["rm", "ppo"]
    assert resumed.completed_stages() == ["sft", "rm", "ppo"]
    assert resumed.done_info("ppo")["summary"] == {"steps": 3}
    assert (resumed.stage_dir("rm") / "adapter.bin").read_bytes() == b"w" * 10
    assert run.ledger_path.read_bytes() == ledger_before
    assert _pipeline(RunDir.resume(run.path)) == []
    with pytest.raises(RunDirError, match="already done"):
        with resumed.stage("sft"):
            pass


def test_half_written_stage_is_not_done(tmp_path):
    """A crash (no exception handling: SIGKILL) leaves a temp dir, or a renamed dir without marker."""
    run = RunDir.create(_Cfg(), dir=tmp_path / "r")
    stages = run.path / "stages"
    (stages / ".sft.tmp-999-dead").mkdir()
    (stages / ".sft.tmp-999-dead" / "partial.bin").write_bytes(b"x")
    (stages / "rm").mkdir()  # renamed but the marker was never written
    (stages / "rm" / "partial.bin").write_bytes(b"x")
    assert not run.is_done("sft") and not run.is_done("rm")
    assert run.completed_stages() == []
    assert _pipeline(RunDir.resume(run.path)) == ["sft", "rm", "ppo"]
    assert not (stages / ".sft.tmp-999-dead").exists()
    assert not (run.stage_dir("rm") / "partial.bin").exists()
    # a marker without its directory is not done either
    os.rename(run.stage_dir("ppo"), stages / "gone")
    assert not run.is_done("ppo")


def test_config_mismatch_is_explained(tmp_path):
    run = RunDir.create(_Cfg(), dir=tmp_path / "r")
    changed = _Cfg(sft=_Sec(lr=0.2, layers=[1, 2, 3]))
    with pytest.raises(RunDirError, match=r"sft\.layers: saved \[1, 2\], given \[1, 2, 3\]; sft\.lr: saved 0\.1"):
        RunDir.resume(run.path, changed)
    RunDir.resume(run.path, _Cfg(run=_Run(dir=str(run.path))))  # run.dir may differ
    with pytest.raises(RunDirError, match="no config.yaml"):
        RunDir.resume(tmp_path / "nothing")


def test_explicit_dir_refuses_an_existing_run(tmp_path):
    RunDir.create(_Cfg(), dir=tmp_path / "r")
    with pytest.raises(RunDirError, match="--resume"):
        RunDir.create(_Cfg(), dir=tmp_path / "r")


def test_summary_must_be_json(tmp_path):
    run = RunDir.create(_Cfg(), dir=tmp_path / "r")
    with pytest.raises(RunDirError, match="not plain JSON"):
        with run.stage("sft") as out:
            out.summary["bad"] = object()
    assert not run.is_done("sft") and not run.stage_dir("sft").exists()


def test_config_diff_nested():
    assert config_diff({"a": {"b": 1}, "c": 2}, {"a": {"b": 1}, "c": 2}) == []
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 2}, "d": 0}) == [
        "a.b: saved 1, given 2",
        "d: not in the saved config, given 0",
    ]


def test_checkpoint_outlives_a_crash_and_goes_only_after_the_commit(tmp_path):
    run = RunDir.create(_Cfg(), dir=tmp_path / "r")
    ckpt = run.checkpoint_dir("rm")
    assert ckpt == run.path / "checkpoints" / "rm"
    with pytest.raises(RuntimeError, match="boom"):
        with run.stage("rm"):
            ckpt.mkdir(parents=True)
            (ckpt / "state.pt").write_bytes(b"s")
            raise RuntimeError("boom")
    assert (ckpt / "state.pt").read_bytes() == b"s"  # kept for the resumed attempt
    with pytest.raises(RunDirError, match="not committed"):
        run.drop_checkpoint("rm")  # a running stage's checkpoint is its only progress record
    with run.stage("rm") as out:
        assert (ckpt / "state.pt").is_file()  # the resumed attempt finds it
        (out.path / "head.bin").write_bytes(b"h")
    assert run.is_done("rm") and not ckpt.exists()  # removed once the stage is committed
    # a crash between the commit and the removal: the stage is done and its stale checkpoint harmless
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"stale")
    resumed = RunDir.resume(run.path)
    assert resumed.is_done("rm")
    resumed.drop_checkpoint("rm")  # what the pipeline does for a done stage; idempotent
    resumed.drop_checkpoint("rm")
    assert not ckpt.exists() and (resumed.stage_dir("rm") / "head.bin").read_bytes() == b"h"


def test_a_field_added_since_the_run_was_saved_resumes_at_its_default(tmp_path):
    """A run saved by an older dpalign lacks fields added since: at their default they are no difference (the
    default keeps the old behaviour), at any other value they are."""
    import yaml

    run = RunDir.create(_Cfg(), dir=tmp_path / "r")
    saved = yaml.safe_load(run.config_path.read_text())
    del saved["sft"]["layers"]  # as if `layers` had been added to _Sec after this run was saved
    run.config_path.write_text(yaml.safe_dump(saved))
    RunDir.resume(run.path, _Cfg())
    with pytest.raises(RunDirError, match=r"sft\.layers: not in the saved config, given \[1, 2, 3\]"):
        RunDir.resume(run.path, _Cfg(sft=_Sec(layers=[1, 2, 3])))
    assert config_diff({"a": {}}, {"a": {"b": 1}}, defaults={"a": {"b": 1}}) == []
    assert config_diff({"a": {}}, {"a": {"b": 2}}, defaults={"a": {"b": 1}}) == ["a.b: not in the saved config, given 2"]

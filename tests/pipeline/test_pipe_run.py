"""`dpalign run` end to end on the tiny config: report, budget, verify, presets, refusals, crash and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "launch" / "configs" / "tiny.yaml")
# A few steps per stage: the point is the plumbing and the accounting, not the utility.
FAST = [
    "sft.steps=2", "sft.expected_batch_users=6",
    "rm.steps=2", "rm.expected_batch_users=6", "rm.gold_pairs=8",
    "ppo.iterations=2", "ppo.expected_users_per_iteration=4", "ppo.max_new_tokens=6", "ppo.rollout_actors=0",
    "eval.prompts=4", "eval.max_new_tokens=6", "eval.perplexity_records=4",
]


@pytest.fixture(scope="module")
def cache(tiny_cache):
    return tiny_cache


def _run(tmp_path: Path, cache: str, *extra: str, name: str = "t") -> tuple[int, Path]:
    run_dir = tmp_path / name
    code = main(["run", "--config", TINY, f"run.cache_dir={cache}", f"run.dir={run_dir}", *FAST, *extra,
                 "--no-progress", "--json"])
    return code, run_dir


def test_private_run_reports_within_budget_and_verifies(tmp_path, cache, capsys):
    code, run_dir = _run(tmp_path, cache)
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["preset"] == "private" and report["status"] == "completed"
    assert set(report["stages"]) == {"sft", "rm", "ppo"}
    for name, entry in report["stages"].items():
        sp = entry["privacy"]
        assert entry["private"] and sp is not None, name
        assert 0 < sp["epsilon_spent"] <= sp["target_epsilon"], name
        assert sp["noise_multiplier"] > 0 and sp["steps"] >= 1, name
    assert report["privacy"]["epsilon"] <= report["privacy"]["target_epsilon"]
    assert report["stages"]["ppo"]["privacy"]["repeats"] == 1
    # the plan the stages ran under: in the run directory and the report, and the ledger's events follow it
    plan = json.loads((run_dir / "plan.json").read_text())
    assert report["privacy_plan"] == plan and plan["composition"] == report["stages"]["sft"]["privacy"]["composition"]
    events = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    for name, stage in plan["stages"].items():
        mine = [e for e in events if e.get("stage") == name and "sampling_rate" in e]
        assert mine and {e["sampling_rate"] for e in mine} == {stage["sampling_rate"]}, name
        assert report["stages"][name]["privacy"]["noise_multiplier"] == pytest.approx(stage["noise_multiplier"])
    ev = report["evaluation"]
    assert set(ev["policies"]) == {"base", "sft", "final"}
    assert ev["reward_model"] is not None and 0 <= ev["reward_model"]["accuracy"] <= 1
    assert summary["status"] == "completed" and summary["epsilon"] == report["privacy"]["epsilon"]
    for rel in ("config.yaml", "ledger.jsonl", "report.md", "stages/sft/adapter", "stages/rm/head.safetensors",
                "stages/ppo/model"):
        assert (run_dir / rel).exists(), rel
    assert any((run_dir / "tb").rglob("events.out.tfevents.*"))

    # the ledger alone reproduces the report's epsilon
    assert main(["privacy", "verify", str(run_dir)]) == 0
    # and a tampered report is caught
    report["privacy"]["epsilon"] *= 0.5
    (run_dir / "report.json").write_text(json.dumps(report))
    assert main(["privacy", "verify", str(run_dir)]) == 1

    # the merged final policy loads through the ordinary Hugging Face path
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "ppo" / "model")
    # the reward model loads as a standard sequence classifier; every export carries its guarantee in a card
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(run_dir / "stages" / "rm" / "model")
    assert rm.config.num_labels == 1
    run_eps = summary["epsilon"]  # (report.json was tampered with above)
    for stage in ("sft", "rm", "ppo"):
        card = (run_dir / "stages" / stage / "model" / "README.md").read_text()
        assert "Privacy unit: **a user**" in card and f"`{stage}` stage" in card and "NOT PRIVATE" not in card
    assert f"ε = {run_eps:.3f}" in (run_dir / "stages" / "ppo" / "model" / "README.md").read_text()


@pytest.mark.parametrize("preset, private_stages", [("nonprivate", set()), ("decoupled", {"rm"}),
                                                      ("ppo_only", {"ppo"})])
def test_presets_protect_what_they_say(tmp_path, cache, preset, private_stages):
    code, run_dir = _run(tmp_path, cache, f"privacy.preset={preset}", name=preset)
    assert code == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert {n for n, e in report["stages"].items() if e["private"]} == private_stages
    if not private_stages:
        assert report["privacy"] is None and not (run_dir / "ledger.jsonl").exists()
    else:
        assert set(report["privacy"]["stages"]) == private_stages
        lines = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
        assert {x["stage"] for x in lines if x["type"] == "event"} == private_stages
        assert main(["privacy", "verify", str(run_dir)]) == 0  # the epsilon is recomputed from those events alone


def test_learned_controller_runs_every_stage_within_budget(tmp_path, cache):
    # on the clinical domain: the controller's reward (SFT's validation loss) is on public NOTES, not reviews
    code, run_dir = _run(tmp_path, cache, "controller.enabled=true", "controller.interval=1",
                         "privacy.accountant=rdp", "sft.steps=3", "rm.steps=3", "data.private_domain=clinical",
                         name="ctrl")
    assert code == 0
    report = json.loads((run_dir / "report.json").read_text())
    from launch.config import load_config
    from launch.schema import RunConfig
    from trainers.data.io import load_public
    from trainers.data.task import build_task
    from trainers.models.base import load_base_model, validation_windows
    from trainers.stages.context import public_lm_loss

    cfg = load_config(RunConfig, str(run_dir / "config.yaml"), [])
    task = build_task(cfg.data, cache_dir=cache, progress=False)
    base, tokenizer = load_base_model(report["base_model"]["path"])
    loss = {}
    for name, path in (("notes", task.validation_text), ("reviews", task.public_valid)):
        texts = list(load_public(path).rows["text"])
        loss[name] = public_lm_loss(base, validation_windows(tokenizer, texts, model_cfg=cfg.model, count=4))
    start = report["stages"]["sft"]["metrics"]["public_valid_loss_start"]
    assert start == pytest.approx(loss["notes"], rel=1e-5) and loss["notes"] > loss["reviews"] + 0.2
    assert report["evaluation"]["policies"]["base"]["perplexity"] == pytest.approx(math.exp(loss["notes"]), rel=1e-5)
    assert report["privacy"]["accountant"] == "rdp"
    for name, entry in report["stages"].items():
        assert entry["privacy"]["epsilon_spent"] <= entry["privacy"]["target_epsilon"], name
    assert main(["privacy", "verify", str(run_dir)]) == 0
    # every stage released through the controller's plans and the ledger recorded them
    events = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    sigmas = {}
    for e in events:
        if e["type"] == "event":
            sigmas.setdefault(e["stage"], set()).add(round(e["noise_multiplier"], 9))
    assert set(sigmas) == {"sft", "rm", "ppo"}


def test_controller_without_rdp_is_refused_at_load(tmp_path, cache, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, cache, "controller.enabled=true", name="ctrl-pld")
    assert exit_info.value.code == 2
    assert "privacy.accountant=rdp" in capsys.readouterr().err


def test_shared_users_without_budget_split_are_refused_before_any_step(tmp_path, cache, capsys):
    code, run_dir = _run(tmp_path, cache, "data.shared_users=3", name="overlap")
    assert code == 2
    err = capsys.readouterr().err
    assert "3 users appear in more than one private stage" in err and "privacy.sft_share" in err
    assert not run_dir.exists()  # refused while planning: nothing spent, no half-made run directory


@pytest.mark.heavy(17)
def test_sequential_composition_with_shares_stays_within_total(tmp_path, cache):
    code, run_dir = _run(tmp_path, cache, "data.shared_users=3", "privacy.sft_share=0.4", "privacy.rm_share=0.3",
                         "privacy.ppo_share=0.3", name="seq")
    assert code == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["privacy"]["composition"] == "sequential"
    assert report["privacy"]["epsilon"] <= report["privacy"]["target_epsilon"]
    targets = {n: e["privacy"]["target_epsilon"] for n, e in report["stages"].items()}
    assert targets == pytest.approx({"sft": 1.6, "rm": 1.2, "ppo": 1.2})


def test_batch_whitening_is_refused_at_load(tmp_path, cache, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, cache, "ppo.objective.advantage_normalization=batch", name="white")
    assert exit_info.value.code == 2
    assert "ppo.objective.advantage_normalization" in capsys.readouterr().err


def _stage_events(ledger: Path, stage: str) -> list[int]:
    """Step indices of ``stage``'s events on the ledger (complete lines only: it may be mid-write)."""
    if not ledger.exists():
        return []
    data = ledger.read_bytes()
    lines = data[: data.rfind(b"\n") + 1].splitlines()
    return [x["step"] for x in map(json.loads, lines) if x["type"] == "event" and x["stage"] == stage]


@pytest.mark.heavy(22)
def test_killed_run_resumes_without_rerunning_finished_stages(tmp_path, cache):
    """SIGKILL in the middle of the reward model, after SFT committed. The resume skips SFT, and RM continues at
    the ledger's count of its steps from its last checkpoint: no step is taken twice, the stage takes exactly its
    T calibrated events, stays within its target, and the run verifies."""
    run_dir = tmp_path / "crash"
    rm_steps, every = 12, 2
    mid_stage = [f"rm.steps={rm_steps}", f"run.checkpoint_every={every}"]
    cmd = [sys.executable, "-m", "launch.cli", "run", "--config", TINY, f"run.cache_dir={cache}",
           f"run.dir={run_dir}", *FAST, *mid_stage, "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run_dir / "stages" / "sft.done"
    ledger = run_dir / "ledger.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if marker.exists() and len(_stage_events(ledger, "rm")) > every:  # past RM's first checkpoint
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the SFT stage never finished"
    assert not (run_dir / "stages" / "rm.done").exists(), "the kill missed the middle of the reward model"
    sft_marker = marker.read_text()
    ledger_before = ledger.read_bytes()
    sft_events = len(_stage_events(ledger, "sft"))
    recorded = _stage_events(ledger, "rm")
    assert recorded == list(range(len(recorded))) and every < len(recorded) < rm_steps
    import torch

    checkpointed = torch.load(run_dir / "checkpoints" / "rm" / "state.pt", weights_only=False)["next_step"]
    assert 0 < checkpointed <= len(recorded) and checkpointed % every == 0
    assert not (run_dir / "checkpoints" / "sft").exists()  # removed with SFT's commit

    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    assert marker.read_text() == sft_marker  # SFT was not rerun
    ledger_after = ledger.read_bytes()
    assert ledger_after.startswith(ledger_before)  # never rolled back
    assert len(_stage_events(ledger, "sft")) == sft_events
    assert _stage_events(ledger, "rm") == list(range(rm_steps))  # each step once: exactly T events
    rm = json.loads((run_dir / "stages" / "rm.done").read_text())["summary"]
    assert rm["status"] == "completed" and rm["steps"] == rm["planned_steps"] == rm_steps
    assert rm["resumed_at_step"] == len(recorded)
    assert rm["steps_lost_in_crash"] == len(recorded) - checkpointed
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed" and set(report["stages"]) == {"sft", "rm", "ppo"}
    for name, entry in report["stages"].items():
        assert entry["status"] == "completed", name
        assert entry["privacy"]["epsilon_spent"] <= entry["privacy"]["target_epsilon"], name
    assert not any((run_dir / "checkpoints").iterdir())  # every committed stage's checkpoint is gone
    assert main(["privacy", "verify", str(run_dir)]) == 0

    # A crash between the ledger's stage_end and the commit of the stage's outputs: the budget is spent and the
    # stage cannot take new releases, so resuming must refuse clearly instead of rerunning it.
    import shutil

    shutil.rmtree(run_dir / "stages" / "ppo")
    (run_dir / "stages" / "ppo.done").unlink()
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 2



def test_impossible_plan_is_a_config_error_and_makes_no_run_directory(tmp_path, cache, capsys):
    code, run_dir = _run(tmp_path, cache, "sft.expected_batch_users=500", name="impossible")
    err = capsys.readouterr().err
    assert code == 2 and not run_dir.exists(), err
    assert "sft.expected_batch_users=500 exceeds the stage's" in err and "Traceback" not in err


@pytest.mark.slow  # ~30 s: the shipped tiny config with its own schedules and 2 rollout actors
def test_tiny_config_runs_as_shipped(tmp_path):
    run_dir = tmp_path / "tiny"
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "run", "--config", TINY, f"run.dir={run_dir}",
                           f"run.cache_dir={tmp_path / 'cache'}", "--no-progress", "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed" and report["noise"]["secret"]
    assert main(["privacy", "verify", str(run_dir)]) == 0

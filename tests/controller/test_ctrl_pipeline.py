"""`dpalign run` reuses what an earlier run's controller learned (RUN_DIR/controller), and refuses an artifact or
granularity that does not fit before anything is spent or made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "launch" / "configs" / "tiny.yaml")
FAST = [
    "sft.steps=3", "sft.expected_batch_users=6",
    "rm.steps=3", "rm.expected_batch_users=6", "rm.gold_pairs=8",
    "ppo.iterations=2", "ppo.expected_users_per_iteration=4", "ppo.max_new_tokens=6", "ppo.rollout_actors=0",
    "eval.prompts=4", "eval.max_new_tokens=6", "eval.perplexity_records=4",
    "privacy.accountant=rdp", "controller.enabled=true", "controller.interval=1",
    "controller.granularity=lora_param", "engine.clipping=per_tensor", "controller.hidden=[8]",
    "controller.batch_size=2", "controller.learning_starts=1",
]


def _run(tmp_path: Path, cache: Path, name: str, *extra: str) -> tuple[int, Path]:
    run_dir = tmp_path / name
    code = main(["run", "--config", TINY, f"run.cache_dir={cache}", f"run.dir={run_dir}", *FAST, *extra,
                 "--no-progress", "--json"])
    return code, run_dir


def test_granularity_needs_its_engine_clipping(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        _run(tmp_path, tmp_path / "cache", "bad", "engine.clipping=per_module")
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "controller.granularity" in msg and "engine.clipping=per_tensor" in msg
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_run_exports_its_controller_and_another_run_reuses_it(tmp_path, capsys):
    cache = tmp_path / "cache"
    code, run1 = _run(tmp_path, cache, "run1")
    assert code == 0
    exported = run1 / "controller"
    assert {p.name for p in exported.iterdir()} == {"sft", "rm", "ppo"}
    capsys.readouterr()
    assert main(["controller", "show", str(exported)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sft"]["provenance"]["source_run"] == str(run1.resolve())
    assert all(shown[s]["granularity"] == "lora_param" and shown[s]["provenance"]["stage"] == s for s in shown)
    # the pre-run check knows every stage's clipping groups exactly as its engine made them
    from launch.config import load_config
    from launch.schema import RunConfig
    from trainers.stages.learner import stage_group_names

    cfg = load_config(RunConfig, str(run1 / "config.yaml"), [])
    base_dir = json.loads((run1 / "report.json").read_text())["base_model"]["path"]
    names = stage_group_names(cfg, base_dir, ["sft", "rm", "ppo"])
    assert {s: shown[s]["spec"]["group_names"] for s in shown} == names
    assert any("lora_A" in n for n in names["ppo"]) and len(names["rm"]) > len(names["sft"])  # + score head

    # frozen reuse on another seed: every stage loads its own export and the run stays within budget
    code, run2 = _run(tmp_path, cache, "run2", "run.seed=7", "controller.mode=frozen", f"controller.load={exported}")
    assert code == 0
    assert main(["privacy", "verify", str(run2)]) == 0
    report = json.loads((run2 / "report.json").read_text())
    assert report["privacy"]["epsilon"] <= report["privacy"]["target_epsilon"]
    frozen = json.loads((run2 / "controller" / "sft" / "artifact.json").read_text())["provenance"]
    assert frozen["mode"] == "frozen" and frozen["parent"] == str(exported / "sft")

    # spaces that do not fit (other LoRA targets: other clipping groups; another granularity) are refused
    # before the ledger or the run directory exist
    capsys.readouterr()
    code, bad = _run(tmp_path, cache, "bad-groups", "controller.mode=frozen", f"controller.load={exported}",
                     "sft.lora.target_modules=[c_attn,c_proj]")
    assert code == 2 and not bad.exists()
    assert "clipping groups" in capsys.readouterr().err
    code, bad = _run(tmp_path, cache, "bad-gran", "controller.mode=frozen", f"controller.load={exported}",
                     "controller.granularity=module", "engine.clipping=per_module")
    assert code == 2 and not bad.exists()
    assert "controller.granularity=lora_param" in capsys.readouterr().err

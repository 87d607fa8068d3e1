"""Reusing what a run learned: a controller exports itself when its stage ends, and the export drives another
run (another seed) in frozen and finetune modes within budget."""

from __future__ import annotations

import json

import numpy as np

from accounting.verify import verify_run
from controller.artifact import load_artifact
from controller.budget import BudgetGuard
from controller.config import ControllerConfig
from controller.policy import LearnedController
from launch.cli import main
from tests.controller import ctrl_helpers as H

TARGET, DELTA, Q, USERS, STEPS = 1.0, 1e-5, 0.25, 24, 6


def _order() -> float:
    return BudgetGuard(target_epsilon=TARGET, delta=DELTA, sampling_rate=Q, steps=STEPS).rdp_order


def _run(model, ctrl, run_dir, seed):
    run_dir.mkdir(parents=True, exist_ok=True)
    return H.run_sft(model, ctrl, run_dir=run_dir, target_epsilon=TARGET, delta=DELTA, q=Q, steps=STEPS,
                     num_users=USERS, rdp_order=_order(), seed=seed, grouping="per_tensor")


def _controller(model, cfg, **kw):
    names = [g.name for g in H.group_specs(model, "per_tensor")]
    return LearnedController(config=cfg, target_epsilon=TARGET, delta=DELTA, sampling_rate=Q, steps=STEPS,
                             validation_loss=H.public_validation(model), rdp_order=_order(), stage="sft",
                             group_names=names, **kw)


def test_exported_controller_drives_another_run_frozen_and_finetune(tmp_path, capsys):
    common = dict(granularity="lora_param", interval=2, batch_size=2, gradient_steps=1, hidden=[8])
    model = H.tiny_lora_lm(2, seed=0)
    online = _controller(model, ControllerConfig(learning_starts=1, **common),
                         export_dir=tmp_path / "run1" / "controller" / "sft", source_run="run1")
    _run(model, online, tmp_path / "run1", seed=0)
    export = tmp_path / "run1" / "controller"
    art = load_artifact(export / "sft")
    assert online.exported == export / "sft" and art.sb3_dir is not None
    assert art.spec.granularity == "lora_param" and art.spec.group_names == online.spec.group_names
    p = art.provenance
    assert (p.stage, p.source_run, p.mode, p.steps, p.env_steps) == ("sft", "run1", "online", STEPS, STEPS // 2)
    assert p.epsilons == [TARGET] and len(p.training_curve) == STEPS // 2
    assert p.model_groups == list(online.spec.group_names) and len(p.model_groups) == 4
    # `dpalign controller show` prints what it is and what it was trained on (RUN_DIR/controller: by stage)
    assert main(["controller", "show", str(export)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sft"]["granularity"] == "lora_param" and shown["sft"]["slots"] == 4
    assert shown["sft"]["provenance"]["stage"] == "sft" and shown["sft"]["has_sb3_state"]
    assert shown["sft"]["provenance"]["reward"] == "validation_gain"

    # frozen: the exported actor acts (deterministically) in a run on another seed
    model2 = H.tiny_lora_lm(2, seed=1)
    frozen = _controller(model2, ControllerConfig(mode="frozen", load=str(export), **common))
    assert frozen.learner is None and frozen.artifact.path == export / "sft"
    ledger = _run(model2, frozen, tmp_path / "run2", seed=1)
    assert len(ledger.events("sft")) == STEPS and ledger.epsilon("sft") <= TARGET
    assert verify_run(tmp_path / "run2").ok
    obs = np.random.default_rng(0).normal(size=art.spec.obs_dim).astype(np.float32)
    np.testing.assert_allclose(frozen.artifact.act(obs), online.learner.model.predict(
        online.learner.obs_norm(obs), deterministic=True)[0], atol=1e-5)  # the actor the first run learned
    assert len(frozen.history) == STEPS // 2

    # finetune: the full SB3 state (replay buffer included) resumes learning
    model3 = H.tiny_lora_lm(2, seed=2)
    tuned = _controller(model3, ControllerConfig(mode="finetune", load=str(export), learning_starts=1, **common),
                        export_dir=tmp_path / "run3" / "controller" / "sft")
    before = tuned.learner.model.replay_buffer.size()
    assert before == STEPS // 2
    ledger = _run(model3, tuned, tmp_path / "run3", seed=2)
    assert tuned.learner.model.replay_buffer.size() == before + STEPS // 2
    assert ledger.epsilon("sft") <= TARGET and verify_run(tmp_path / "run3").ok
    again = load_artifact(tmp_path / "run3" / "controller" / "sft").provenance
    assert again.mode == "finetune" and again.parent == str(export / "sft")

"""The privacy plan: sigma for every stage is computed once, in ``trainers.stages.plan``, before any step.

A recipe given its plan never calls a calibration function (they are replaced here by functions that fail), runs
at the plan's sigma and schedule, and refuses a plan made for other data or another schedule before the ledger
hears of the stage. ``prepare_run`` agrees with calibrating each stage on its own at the run's order.
"""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, replace

import pytest

import accounting.calibration
import trainers.stages.plan as plan_module
from accounting.ledger import read_ledger
from launch.config import load_config
from launch.schema import RunConfig
from tests.stages.test_stage_learners import OVERRIDES, TARGET_DELTA, TARGET_EPS, dirs, open_ledger  # noqa: F401
from trainers.stages.context import StageContext
from trainers.stages.plan import StagePlan, calibrate_sigma, plan_stage, prepare_run


def _users(prefix: str, n: int) -> set[str]:
    return {f"{prefix}-{i}" for i in range(n)}


@pytest.mark.heavy(11)
def test_prepare_run_is_one_frozen_plan_from_the_data():
    cfg = load_config(RunConfig, None, ["privacy.target_epsilon=4", "privacy.accountant=rdp",
                                        "sft.expected_batch_users=8", "sft.steps=20",
                                        "rm.expected_batch_users=8", "rm.steps=10", "ppo.expected_users_per_iteration=4",
                                        "ppo.iterations=5", "ppo.ppo_epochs=2"])
    disjoint = {"sft": _users("a", 80), "rm": _users("b", 40), "ppo": _users("c", 20)}
    plan = prepare_run(cfg, disjoint)
    assert plan.composition == "parallel" and plan.private == ("sft", "rm", "ppo")
    assert plan.accountant == "rdp" and plan.rdp_order is not None
    for name, n, q, steps, k in (("sft", 80, 0.1, 20, 1), ("rm", 40, 0.2, 10, 1), ("ppo", 20, 0.2, 5, 2)):
        s = plan[name]
        assert (s.num_users, s.sampling_rate, s.steps, s.repeats) == (n, pytest.approx(q), steps, k)
        assert s.target_epsilon == 4.0 and s.rdp_order == plan.rdp_order
        # the one calibration, at the run's order: sigma is the smallest that meets the target
        assert s.noise_multiplier == calibrate_sigma(
            target_epsilon=4.0, delta=s.delta, sampling_rate=s.sampling_rate, steps=steps, repeats=k,
            accountant="rdp", rdp_order=plan.rdp_order)
    assert plan["ppo"].noise_multiplier != plan["sft"].noise_multiplier  # K = 2 epochs and its own q, T
    with pytest.raises(FrozenInstanceError):
        plan["sft"].noise_multiplier = 0.1  # type: ignore[misc]
    assert json.loads(json.dumps(plan.to_dict()))["stages"]["rm"]["num_users"] == 40

    shared = {"sft": _users("a", 80), "rm": _users("a", 40), "ppo": _users("a", 20)}
    cfg_seq = load_config(RunConfig, None, ["privacy.target_epsilon=4", "privacy.sft_share=0.5",
                                            "privacy.rm_share=0.25", "privacy.ppo_share=0.25",
                                            "sft.expected_batch_users=8", "rm.expected_batch_users=8",
                                            "ppo.expected_users_per_iteration=4"])
    seq = prepare_run(cfg_seq, shared)
    assert seq.composition == "sequential" and seq.accountant == "pld" and seq.rdp_order is None
    assert [seq[s].target_epsilon for s in ("sft", "rm", "ppo")] == [2.0, 1.0, 1.0]


def test_a_recipe_given_its_plan_never_calibrates(dirs, tmp_path, monkeypatch):  # noqa: F811
    from trainers.stages.sft import run_sft

    cfg = load_config(RunConfig, None, OVERRIDES)
    ledger = open_ledger(tmp_path)
    q = cfg.sft.sampling_rate(12)
    stage = plan_stage("sft", private=True, num_users=12, sampling_rate=q, steps=cfg.sft.steps,
                       target_epsilon=TARGET_EPS, delta=TARGET_DELTA, accountant=ledger.run.accountant,
                       rdp_order=ledger.run.rdp_order, composition="parallel")
    calls = []

    def refuse(*args, **kwargs):
        calls.append(kwargs)
        raise AssertionError("a recipe given its plan calibrated sigma")

    for module, name in ((plan_module, "calibrate_sigma"), (plan_module, "calibrate_at_rdp_order"),
                         (plan_module, "calibrate_noise_multiplier"), (accounting.calibration, "calibrate_at_rdp_order"),
                         (accounting.calibration, "calibrate_noise_multiplier")):
        monkeypatch.setattr(module, name, refuse)
    ctx = StageContext(stage="sft", cfg=cfg, private=True, ledger=ledger, plan=stage, seed=5, progress=False)
    try:
        summary = run_sft(ctx, base_dir=dirs["base"], data_path=str(dirs["d1"]), out_dir=tmp_path / "out")
    finally:
        ctx.ledger.close()
    assert calls == []
    assert summary["noise_multiplier"] == stage.noise_multiplier
    events = read_ledger(tmp_path / "ledger.jsonl").events
    assert len(events) == cfg.sft.steps
    assert {e.sampling_rate for e in events} == {q}
    # the events' sigma_eff is the plan's (recomposed from the gradient and count noise: float rounding only)
    assert all(e.noise_multiplier == pytest.approx(stage.noise_multiplier, rel=1e-12) for e in events)


@pytest.mark.parametrize("field, value", [("num_users", 13), ("sampling_rate", 0.25), ("steps", 3),
                                          ("accountant", "rdp")])
def test_a_plan_for_other_data_or_schedule_is_refused_before_the_ledger_hears_of_the_stage(
        dirs, tmp_path, field, value):  # noqa: F811
    from trainers.stages.sft import run_sft

    cfg = load_config(RunConfig, None, OVERRIDES)
    ledger = open_ledger(tmp_path)
    right = StagePlan(stage="sft", private=True, num_users=12, sampling_rate=cfg.sft.sampling_rate(12),
                      steps=cfg.sft.steps, target_epsilon=TARGET_EPS, delta=TARGET_DELTA, noise_multiplier=1.0,
                      accountant=ledger.run.accountant, rdp_order=ledger.run.rdp_order)
    ctx = StageContext(stage="sft", cfg=cfg, private=True, ledger=ledger, plan=replace(right, **{field: value}),
                       seed=5, progress=False)
    try:
        with pytest.raises(ValueError, match="the privacy plan was made for|but the ledger accounts with"):
            run_sft(ctx, base_dir=dirs["base"], data_path=str(dirs["d1"]), out_dir=tmp_path / "out")
        assert "sft" not in ledger.report()["stages"]
    finally:
        ledger.close()
    assert read_ledger(tmp_path / "ledger.jsonl").events == []

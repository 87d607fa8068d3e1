"""Smoke run of benchmarks/controller.py (slow: builds the tiny embedded task and base model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_controller_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_controller", ROOT / "benchmarks" / "controller.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(
        [
            "--seeds",
            "1",
            "--steps",
            "4",
            "--interval",
            "2",
            "--eval-every",
            "2",
            "--epsilons",
            "2",
            "--methods",
            "fixed",
            "online",
            "--json",
            "data.num_users=300",
            f"run.cache_dir={tmp_path}",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    methods = out["table"]["2.0"]["methods"]
    assert set(methods) == {"fixed", "online"}
    assert all(r["epsilon_spent"] <= 2.0 for r in out["runs"])
    assert methods["online"]["overhead_share"] > 0 and len(methods["fixed"]["curve_values"]) == 3


def test_clinical_benchmark_reports_headroom_and_the_gap_each_method_closes(tmp_path, capsys, tiny_cache):
    """On the clinical domain: the non-private run (one per seed, shared by every epsilon) gives the headroom over
    the base model and the far end of each private method's gap; the private run spends exactly its epsilon."""
    spec = importlib.util.spec_from_file_location("bench_controller", ROOT / "benchmarks" / "controller.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--seeds", "1", "--steps", "6", "--eval-every", "3", "--epsilons", "1", "4", "--methods", "nonprivate",
            "fixed", "noise_schedule", "--json", "data.num_users=120", "data.private_domain=clinical", f"run.cache_dir={tiny_cache}"]
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stage"] == "sft" and out["metric"] == "heldout_ppl"
    assert out["settings"]["config"] == "launch/configs/tiny.yaml"  # no machine path in the committed JSON
    nonprivate = [r for r in out["runs"] if r["method"] == "nonprivate"]
    assert [r["epsilon_target"] for r in nonprivate] == [1.0, 4.0] and nonprivate[0]["curve"] == nonprivate[1]["curve"]
    for eps in ("1.0", "4.0"):
        t = out["table"][eps]
        m = t["methods"]
        assert t["base"] == pytest.approx(nonprivate[0]["curve"][0][1])
        assert t["nonprivate_headroom"] == pytest.approx(1 - m["nonprivate"]["final"] / t["base"])
        assert t["nonprivate_headroom"] > 0  # six non-private steps on notes the base model never saw already help
        assert m["fixed"]["gap_closed"] == 0.0 and m["nonprivate"]["gap_closed"] == pytest.approx(1.0)
        assert m["fixed"]["steps_to_fixed"] == 6 and float(eps) * 0.999 < m["fixed"]["max_epsilon_spent"] <= float(eps)
        assert float(eps) * 0.999 < m["noise_schedule"]["max_epsilon_spent"] <= float(eps)  # same budget, other shape
    assert all(r["ledger_verified"] for r in out["runs"] if r["method"] != "nonprivate")


def test_reward_model_stage_measures_heldout_pairs_and_rewards_the_controller_on_public_pairs(tmp_path, capsys,
                                                                                            tiny_cache):
    """--stage rm: the DP reward model on D2's training users, measured on the held-out users' labelled pairs
    (Bradley-Terry loss, lower is better, and accuracy); every private method spends exactly its epsilon, and a
    learned controller runs on the stage's own clipping groups (LoRA + score head) with a public reward."""
    spec = importlib.util.spec_from_file_location("bench_controller", ROOT / "benchmarks" / "controller.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--stage", "rm", "--seeds", "1", "--steps", "4", "--interval", "2", "--eval-every", "2", "--epsilons",
            "2", "--methods", "nonprivate", "fixed", "online", "--json", "data.num_users=120",
            "data.private_domain=clinical", "rm.gold_pairs=8", f"run.cache_dir={tiny_cache}"]
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stage"] == "rm" and out["metric"] == "heldout_bt_loss"
    t = out["table"]["2.0"]
    assert 0.3 < t["base"] < 1.5  # a fresh score head: about log 2 on held-out pairs
    for r in out["runs"]:
        assert 0.0 <= r["heldout_accuracy"] <= 1.0 and len(r["curve"]) == 3
        if r["method"] != "nonprivate":
            assert 2.0 * 0.999 < r["epsilon_spent"] <= 2.0
    assert t["methods"]["online"]["overhead_share"] > 0
    # the held-out metric is the one the module computes on the TEST users (a quarter of D2's users)
    prep = bench.prepare(bench.argparse.Namespace(
        stage="rm", config=str(ROOT / "launch/configs/tiny.yaml"),
        overrides=["data.num_users=120", "data.private_domain=clinical", "rm.gold_pairs=8",
                   f"run.cache_dir={tiny_cache}"]))
    bench.torch.manual_seed(0)  # as run_one seeds seed 0: the same fresh LoRA and score head
    model, _, _ = prep["build"](prep["base"])
    loss, acc = bench.heldout_bt(model, prep["test_records"])
    assert t["base"] == pytest.approx(loss, rel=1e-6) and 0.0 <= acc <= 1.0
    assert prep["users"].num_users == out["num_users"] and prep["test_records"]["c_ids"].shape[0] > 0


def test_geometric_noise_schedule_spends_what_the_constant_one_does():
    """The noise_schedule baseline: sigma falls (or rises) geometrically by the given ratio and its first sigma is
    the smallest whose RDP at the guard's order stays within the constant schedule's (equal epsilon)."""
    from controller.budget import BudgetGuard

    spec = importlib.util.spec_from_file_location("bench_controller", ROOT / "benchmarks" / "controller.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    guard = BudgetGuard(target_epsilon=2.0, delta=1e-5, sampling_rate=0.02, steps=50)
    budget = guard.steps * guard._rdp(guard.sigma_reference)
    for ratio in (0.5, 1.0, 2.0):
        sigmas = bench.geometric_noise_schedule(guard, ratio=ratio)
        assert len(sigmas) == 50 and sigmas[-1] / sigmas[0] == pytest.approx(ratio)
        spent = sum(guard._rdp(s) for s in sigmas)  # the guard's own per-step RDP: the schedule is checked against it
        assert budget * (1 - 1e-6) <= spent <= budget
    assert bench.geometric_noise_schedule(guard, ratio=1.0)[0] == pytest.approx(guard.sigma_reference, rel=1e-6)


def test_finetune_method_warm_starts_from_the_pretrained_controller_under_rldps_reward(tmp_path, capsys,
                                                                                       tiny_cache, monkeypatch):
    """--methods frozen finetune: one controller pretrained on the public proxy (under the reward the runs use)
    drives both (finetune keeps learning from it); both spend exactly their epsilon, and a mistyped or invalid
    --controller field fails before the task is built."""
    spec = importlib.util.spec_from_file_location("bench_controller", ROOT / "benchmarks" / "controller.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--seeds", "1", "--steps", "8", "--interval", "2", "--eval-every", "4", "--epsilons", "2",
            "--methods", "frozen", "finetune", "--pretrain-episodes", "1", "--controller", "reward=gain_per_budget",
            "--pretrain-controller", "ent_coef=0.001", "gradient_steps=2", "--json", "data.num_users=120", "data.private_domain=clinical", f"run.cache_dir={tiny_cache}"]
    import controller.sb3

    real_train, seen = controller.sb3.train_sb3, []

    def recording_train(env, *, config, **kw):  # the real pretraining, with its config recorded
        seen.append((config, env.unwrapped.cfg))
        return real_train(env, config=config, **kw)

    monkeypatch.setattr(controller.sb3, "train_sb3", recording_train)
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["pretrain_seconds"] > 0  # pretrained once, shared by both methods
    [(pre, env_cfg)] = seen
    assert (pre.ent_coef, pre.gradient_steps, pre.reward, env_cfg.reward) == (
        "0.001", 2, "gain_per_budget", "gain_per_budget")
    runs = {r["method"]: r for r in out["runs"]}
    assert set(runs) == {"frozen", "finetune"}
    for r in runs.values():
        assert 2.0 * 0.999 < r["epsilon_spent"] <= 2.0 and r["policy_seconds"] > 0 and r["ledger_verified"]
    assert out["settings"]["controller"] == ["reward=gain_per_budget"]
    assert out["settings"]["pretrain_controller"] == ["ent_coef=0.001", "gradient_steps=2"]
    with pytest.raises(SystemExit, match="--controller"):
        bench.main(["--controller", "rewards=gain_per_budget", "--methods", "fixed"])
    with pytest.raises(SystemExit, match="controller.reward"):
        bench.main(["--controller", "reward=perplexity", "--methods", "fixed"])
    with pytest.raises(SystemExit, match="controller.ent_coef"):
        bench.main(["--pretrain-controller", "ent_coef=-1", "--methods", "frozen"])

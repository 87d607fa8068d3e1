# ruff: noqa: F811  (pytest fixtures imported from test_stage_ppo are test parameters here)
"""The DP-PPO learner on Ray Train workers gives the in-process result (same adapter, same ledger events).

Fixtures come from ``test_stage_ppo`` (tiny SFT/RM directories, D3, the config overrides). The in-process
reference generates in its own process; the Ray Train runs start the rollout actors from rank 0 (LoRA-only sync),
which equal in-process generation (``test_stage_ppo.test_ray_rollouts_equal_in_process``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_stage_ppo import (  # noqa: F401  (dirs is a module fixture)
    EVAL_PROMPTS,
    NUM_USERS,
    TARGET_DELTA,
    TARGET_EPS,
    dirs,
    make_cfg,
)

from accounting.events import PrivacyEvent
from accounting.ledger import Ledger, read_ledger
from trainers.stages.context import StageContext

RAY = ["ray.address=local", "ray.num_cpus=4"]


def run_stage(dirs, root: Path, *extra: str, distributed: bool = False, use_ray: bool = False,
              spent_before: bool = False):
    """One private PPO stage with a real ledger; returns (summary, trained tensors, PPO ledger events)."""
    from safetensors.torch import load_file

    from trainers.stages.ppo import run_ppo

    cfg = make_cfg(*RAY, *extra)
    composition = "sequential" if spent_before else "parallel"
    ledger = Ledger.open(root / "ledger.jsonl", run_id="t", target_epsilon=TARGET_EPS, target_delta=TARGET_DELTA,
                         composition=composition)
    if spent_before:  # another stage already spent the run's budget: the filter refuses PPO's first step
        ledger.begin_stage("sft", user_fingerprint="x", num_users=10, target_delta=TARGET_DELTA)
        ledger.record(PrivacyEvent("sft", 0, "gradient", 1.0, 0.3), enforce=False)
    ctx = StageContext(stage="ppo", cfg=cfg, private=True, ledger=ledger, target_epsilon=TARGET_EPS,
                       target_delta=TARGET_DELTA, seed=3, progress=False, distributed=distributed,
                       eval_prompts=EVAL_PROMPTS, ray_storage=root / "ray_train")
    try:
        summary = run_ppo(ctx, sft_dir=dirs["sft"], rm_dir=dirs["rm"], prompts_path=str(dirs["d3"]),
                          out_dir=root / "out", use_ray=use_ray)
        assert summary["epsilon"] == ctx.ledger.epsilon("ppo")  # the reopened ledger is the live one
    finally:
        ctx.ledger.close()
    out = root / "out"
    tensors = {}
    if (out / "adapter").exists():
        tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        tensors.update({f"value_head.{k}": v for k, v in load_file(str(out / "value_head.safetensors")).items()})
    events = [e for e in read_ledger(root / "ledger.jsonl").events if e.stage == "ppo"]
    return summary, tensors, events


def assert_same_training(ref, got, *, atol: float) -> None:
    ref_summary, ref_tensors, ref_events = ref
    summary, tensors, events = got
    assert summary["status"] == ref_summary["status"] == "completed"
    assert summary["steps"] == ref_summary["steps"] == 2
    assert set(tensors) == set(ref_tensors) and any(k.startswith("value_head.") for k in tensors)
    for name, want in ref_tensors.items():
        torch.testing.assert_close(tensors[name], want, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    # exactly one event per iteration (K = 2 epochs are repeats of it), noise once: same multipliers
    assert [(e.step, e.repeats) for e in events] == [(0, 2), (1, 2)]
    assert [(e.step, e.sampling_rate, e.noise_multiplier, e.repeats) for e in events] == [
        (e.step, e.sampling_rate, e.noise_multiplier, e.repeats) for e in ref_events
    ]
    assert summary["last_event_noise_multiplier"] == ref_summary["last_event_noise_multiplier"]
    assert summary["noise_multiplier"] == ref_summary["noise_multiplier"] and summary["epsilon"] == ref_summary["epsilon"]
    assert [h["iteration"] for h in summary["history"]] == [0, 1, 2]
    assert [h.get("beta") for h in summary["history"]] == [h.get("beta") for h in ref_summary["history"]]


@pytest.fixture(scope="module")
def reference(dirs):
    """The in-process learner, rank 0 generating in its own process."""
    return run_stage(dirs, dirs["root"] / "ppo-local")


@pytest.mark.heavy(20)
def test_one_ray_worker_with_in_process_generation_equals_in_process(dirs, ray_module, reference):
    """ray.num_workers=1, ppo.rollout_actors=0: the Ray Train worker generates itself; the outputs come back."""
    got = run_stage(dirs, dirs["root"] / "ppo-ray1", "ray.num_workers=1", "ppo.rollout_actors=0",
                    distributed=True, use_ray=False)
    assert_same_training(reference, got, atol=1e-6)
    summary = got[0]
    assert summary["learner_workers"] == 1 and summary["rollout"]["ray_actors"] == 0
    assert summary["history"] == reference[0]["history"]  # one rank: the same public evaluations
    out = dirs["root"] / "ppo-ray1" / "out"
    assert (out / "model" / "config.json").is_file() and (out / "summary.json").is_file()
    assert not (out / "learner_result.pt").exists()


@pytest.mark.slow  # ~35 s on 2 shared cores: two Ray Train workers, each loading three models, plus 2 actors
def test_two_gloo_workers_with_rollout_actors_equal_in_process(dirs, ray_module, reference):
    got = run_stage(dirs, dirs["root"] / "ppo-ray2", "ray.num_workers=2", distributed=True, use_ray=True)
    assert_same_training(reference, got, atol=1e-5)
    summary = got[0]
    assert summary["learner_workers"] == 2 and summary["rollout"]["ray_actors"] == 2
    assert summary["rollout"]["sync_count"] == 3 and summary["rollout"]["sync_bytes"] > 0  # start + per iteration


@pytest.mark.slow  # ~45 s: DeepSpeed import and engine set-up in each worker
def test_deepspeed_zero2_ppo_learners_equal_in_process(dirs, ray_module, reference):
    got = run_stage(dirs, dirs["root"] / "ppo-ds2", "ray.num_workers=2", "ppo.rollout_actors=0",
                    "deepspeed.enabled=true", "deepspeed.zero_stage=2", distributed=True)
    assert_same_training(reference, got, atol=1e-5)


@pytest.mark.slow  # ~30 s: one more Ray Train run
def test_refusal_on_rank_0_stops_every_rank_cleanly(dirs, ray_module):
    """Rank 0's filter refuses the first step; rank 1 hears it before the all-reduce (no collective timeout), the
    stage ends "refused" and nothing of PPO is on the ledger."""
    root = dirs["root"] / "ppo-refused"
    summary, _, events = run_stage(dirs, root, "ray.num_workers=2", "ppo.rollout_actors=0",
                                   "ray.collective_timeout_s=60", distributed=True, spent_before=True)
    assert summary["status"] == "refused" and summary["steps"] == 0 and "budget" in summary["reason"]
    assert events == []
    assert read_ledger(root / "ledger.jsonl").stage_end["ppo"]["status"] == "refused"


def _refused_before_anything(dirs, tmp_path, *extra: str, match: str) -> None:
    from trainers.stages.ppo import run_ppo

    cfg = make_cfg(*RAY, *extra)
    ledger = Ledger.open(tmp_path / "ledger.jsonl", run_id="r", target_epsilon=TARGET_EPS, target_delta=TARGET_DELTA)
    ctx = StageContext(stage="ppo", cfg=cfg, private=True, ledger=ledger, target_epsilon=TARGET_EPS,
                       target_delta=TARGET_DELTA, seed=3, progress=False, distributed=True,
                       eval_prompts=EVAL_PROMPTS)
    try:
        with pytest.raises(ValueError, match=match):
            run_ppo(ctx, sft_dir=dirs["sft"], rm_dir=dirs["rm"], prompts_path=str(dirs["d3"]),
                    out_dir=tmp_path / "out", use_ray=True)
    finally:
        ledger.close()
    assert read_ledger(tmp_path / "ledger.jsonl").stages == {}  # refused before the stage began


def test_zero3_is_refused_before_the_stage_begins(dirs, tmp_path):
    _refused_before_anything(dirs, tmp_path, "ray.num_workers=2", "deepspeed.enabled=true", "deepspeed.zero_stage=3",
                             match="deepspeed.zero_stage=3")


def test_rollout_actors_that_cannot_fit_are_refused(dirs, ray_module, tmp_path):
    _refused_before_anything(dirs, tmp_path, "ray.num_workers=3", "ppo.rollout_actors=2",
                             match=r"need 5 CPUs and the Ray cluster has 4")


def test_sample_is_sharded_by_user_and_covers_every_record(dirs):
    """The shards of two ranks are disjoint, keep each user's records together and cover the sample."""
    from trainers.data.io import load_prompts
    from trainers.engine.sampling import PoissonUserSampler
    from trainers.rlhf.models import load_ppo_models
    from trainers.rollout import Rollout
    from trainers.stages.context import UserIndex
    from trainers.stages.ppo import shard_batch

    cfg = make_cfg()
    ctx = StageContext(stage="ppo", cfg=cfg, private=False, seed=3, progress=False)
    models = load_ppo_models(sft_dir=dirs["sft"], rm_dir=dirs["rm"], lora=ctx.cfg.ppo.lora, seed=ctx.seed)
    users = UserIndex.from_ids(list(load_prompts(dirs["d3"]).rows["user_id"]))
    sampled = PoissonUserSampler(NUM_USERS, sampling_rate=0.5, seed=3).sample(0)
    records = users.records_of(sampled)
    gen = [Rollout([5, 6 + i % 3], [7, 8, 9][: 1 + i % 3], "") for i in range(records.numel())]
    kw = dict(sampled=sampled, records=records, users=users, beta=0.1, objective=cfg.ppo.objective,
              chunk_records=4)
    whole = shard_batch(models, gen, rank=0, world_size=1, **kw)
    parts = [shard_batch(models, gen, rank=r, world_size=2, **kw) for r in range(2)]
    assert all(p.num_records > 0 for p in parts)
    ids = [set(p.user_ids.tolist()) for p in parts]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(whole.user_ids.tolist())
    assert sum(p.num_records for p in parts) == whole.num_records == records.numel()
    joined = torch.cat([p.records.advantages for p in parts])
    torch.testing.assert_close(joined, whole.records.advantages, rtol=0, atol=1e-6)


def _crashing_after_checkpoint(step_to_crash: int):
    """``learn_ppo`` that dies right after its checkpoint of iteration ``step_to_crash`` (a planted crash)."""
    from trainers.stages.ppo import learn_ppo

    def learn(ctx, plan, learner):
        checkpoint = learner.checkpoint

        def checkpoint_then_crash(state_fn, *, step):
            checkpoint(state_fn, step=step)
            if step == step_to_crash:
                raise RuntimeError("planted crash")

        learner.checkpoint = checkpoint_then_crash
        return learn_ppo(ctx, plan, learner)

    return learn


def test_crash_then_resume_from_checkpoint_equals_uninterrupted(dirs, reference, tmp_path, monkeypatch):
    """In-process checkpoint after iteration 1 (LoRA, value head, Adam, beta, history), a crash, then a resume:
    the same adapter and ledger as the uninterrupted run, with no iteration taken twice."""
    import trainers.stages.ppo as ppo

    root = tmp_path / "resumed"
    ledger = Ledger.open(root / "ledger.jsonl", run_id="t", target_epsilon=TARGET_EPS, target_delta=TARGET_DELTA,
                         composition="parallel")
    cfg = make_cfg(*RAY, "run.checkpoint_every=1", "ppo.objective.kl_controller=adaptive",
                   "ppo.objective.kl_target=0.001")

    def attempt():
        ctx = StageContext(stage="ppo", cfg=cfg, private=True, ledger=ledger, target_epsilon=TARGET_EPS,
                           target_delta=TARGET_DELTA, seed=3, progress=False, checkpoint_dir=root / "ck",
                           eval_prompts=EVAL_PROMPTS)
        return ppo.run_ppo(ctx, sft_dir=dirs["sft"], rm_dir=dirs["rm"], prompts_path=str(dirs["d3"]),
                           out_dir=root / "out", use_ray=False)

    try:
        with monkeypatch.context() as m:
            m.setattr(ppo, "learn_ppo", _crashing_after_checkpoint(1))
            with pytest.raises(RuntimeError, match="planted crash"):
                attempt()
        assert [e.step for e in ledger.events() if e.stage == "ppo"] == [0]
        resumed = attempt()
        full_root = tmp_path / "full"
        full = run_stage(dirs, full_root, "run.checkpoint_every=0", "ppo.objective.kl_controller=adaptive",
                         "ppo.objective.kl_target=0.001")
    finally:
        ledger.close()
    from safetensors.torch import load_file

    assert resumed["status"] == "completed" and resumed["resumed_at_step"] == 1
    assert resumed["steps_lost_in_crash"] == 0
    got = load_file(str(root / "out" / "adapter" / "adapter_model.safetensors"))
    got.update({f"value_head.{k}": v for k, v in load_file(str(root / "out" / "value_head.safetensors")).items()})
    assert got.keys() == full[1].keys()
    for name, want in full[1].items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=lambda msg, n=name: f"{n}: {msg}")
    events = [e for e in read_ledger(root / "ledger.jsonl").events if e.stage == "ppo"]
    assert [(e.step, e.noise_multiplier) for e in events] == [(e.step, e.noise_multiplier) for e in full[2]]
    # beta adapted from the public KL after iteration 1 came back from the checkpoint, as did the history
    assert resumed["beta_final"] == full[0]["beta_final"] != cfg.ppo.objective.init_kl_coef
    assert resumed["history"] == full[0]["history"]

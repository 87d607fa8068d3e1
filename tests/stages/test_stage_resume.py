"""In-stage resume: where a crashed stage restarts (resume_step) and its atomic, single-file checkpoint."""

from __future__ import annotations

import pytest
import torch

from accounting.events import PrivacyEvent
from accounting.ledger import Ledger
from trainers.stages.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from trainers.stages.context import StageContext
from trainers.stages.learner import local_learner, resume_step


def _ledger_with(tmp_path, steps: int) -> Ledger:
    ledger = Ledger.open(tmp_path / "ledger.jsonl", run_id="r", target_epsilon=8.0, target_delta=1e-5)
    ledger.begin_stage("sft", user_fingerprint="sha256:u", num_users=100)
    for step in range(steps):
        ledger.record(PrivacyEvent(stage="sft", step=step, purpose="gradient", sampling_rate=0.05,
                                   noise_multiplier=1.0))
    return ledger


def _ctx(ledger: Ledger | None, *, private: bool = True) -> StageContext:
    return StageContext(stage="sft", cfg=None, private=private, ledger=ledger)


def test_resume_step_never_retakes_a_recorded_step(tmp_path):
    with _ledger_with(tmp_path, 7) as ledger:
        ctx = _ctx(ledger)
        assert resume_step(ctx, restored_step=4) == 7  # ledger ahead of the checkpoint: steps 4..6 are skipped
        assert resume_step(ctx, restored_step=7) == 7  # checkpoint at the ledger's count: nothing lost
        assert resume_step(ctx, restored_step=0) == 7  # no checkpoint: every recorded step is lost, none retaken
        # a Ray worker passes the count it read from the sink actor; the local ledger is then not consulted
        assert resume_step(_ctx(None), restored_step=2, recorded_steps=5) == 5


def test_resume_step_checkpoint_only_and_nothing(tmp_path):
    with _ledger_with(tmp_path, 0) as ledger:
        assert resume_step(_ctx(ledger), restored_step=0) == 0  # nothing: a fresh start
        assert resume_step(_ctx(ledger), restored_step=3) == 3  # checkpoint only
    assert resume_step(_ctx(None, private=False), restored_step=6) == 6  # non-private: the checkpoint decides
    assert resume_step(_ctx(None, private=False), restored_step=0) == 0
    with pytest.raises(ValueError, match="ledger's count"):
        resume_step(_ctx(None), restored_step=3)  # private without any count: refuse rather than guess


def test_checkpoint_is_replaced_atomically_and_checked_against_its_stage(tmp_path):
    d = tmp_path / "ck"
    meta = {"stage": "sft", "user_fingerprint": "sha256:u", "seed": 3}
    assert load_checkpoint(d, meta=meta) is None
    save_checkpoint(d, {"next_step": 2, "x": torch.ones(3), "meta": meta})
    save_checkpoint(d, {"next_step": 4, "x": torch.zeros(3), "meta": meta})
    assert sorted(p.name for p in d.iterdir()) == [CHECKPOINT_FILE]  # only the latest, no temp file
    (d / f".{CHECKPOINT_FILE}.tmp-1-dead").write_bytes(b"torn")  # a write a crash interrupted
    state = load_checkpoint(d, meta=meta)
    assert state["next_step"] == 4 and torch.equal(state["x"], torch.zeros(3))
    assert sorted(p.name for p in d.iterdir()) == [CHECKPOINT_FILE]
    with pytest.raises(RuntimeError, match="not of this stage"):
        load_checkpoint(d, meta={**meta, "user_fingerprint": "sha256:other"})


def test_local_learner_checkpoints_every_interval_and_restores(tmp_path):
    from launch.config import load_config
    from launch.schema import RunConfig

    cfg = load_config(RunConfig, None, ["run.checkpoint_every=3"])
    ctx = StageContext(stage="rm", cfg=cfg, private=False, seed=1, checkpoint_dir=tmp_path / "ck")
    learner = local_learner(ctx, fingerprint="sha256:u", out_dir=tmp_path / "out")
    assert learner.restored is None and learner.checkpoint_every == 3
    for step in range(1, 8):
        learner.checkpoint(lambda s=step: {"next_step": s}, step=step)
    again = local_learner(ctx, fingerprint="sha256:u", out_dir=tmp_path / "out")
    assert again.restored["next_step"] == 6  # the last multiple of 3 before the "crash" at 7
    off = StageContext(stage="rm", cfg=load_config(RunConfig, None, ["run.checkpoint_every=0"]), private=False,
                       seed=1, checkpoint_dir=tmp_path / "off")
    quiet = local_learner(off, fingerprint="sha256:u", out_dir=tmp_path / "out")
    quiet.checkpoint(lambda: {"next_step": 3}, step=3)
    assert not (tmp_path / "off").exists()  # 0 disables checkpoints


def test_ray_worker_learner_writes_the_run_dir_checkpoint_on_rank_0_only(tmp_path):
    """A Ray Train rank (ray_report off, i.e. ray.max_failures=0) still checkpoints into the run directory: rank 0
    writes the state with its meta and the metrics recorded so far (replayed after a resume); other ranks compute
    the state (it may be collective) but write nothing."""
    from trainers.stages.learner import Learner, LearnerMetrics

    meta = {"stage": "sft", "user_fingerprint": "sha256:u", "seed": 3}
    calls: list[int] = []

    def state() -> dict:
        calls.append(1)
        return {"next_step": 2}

    other = Learner(rank=1, world_size=2, checkpoint_every=2, checkpoint_dir=tmp_path / "ck", checkpoint_meta=meta,
                    recorder=LearnerMetrics())
    other.checkpoint(state, step=2)
    assert calls == [1] and not (tmp_path / "ck").exists()
    recorder = LearnerMetrics()
    recorder.log("privacy/epsilon", 0.5, step=2, stage="sft", private=False)
    main = Learner(rank=0, world_size=2, checkpoint_every=2, checkpoint_dir=tmp_path / "ck", checkpoint_meta=meta,
                   recorder=recorder)
    main.checkpoint(state, step=1)  # not a multiple of checkpoint_every: nothing
    assert calls == [1]
    main.checkpoint(state, step=2)
    restored = load_checkpoint(tmp_path / "ck", meta=meta)
    assert restored["next_step"] == 2 and [r["key"] for r in restored["metrics_rows"]] == ["privacy/epsilon"]

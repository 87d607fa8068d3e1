"""`dpalign run` with ray.num_workers=1: the SFT, reward-model and PPO learners all run on Ray Train workers.

Slow (three Ray Train start-ups, about 20 s each on 2 cores); the equality of worker and in-process learners is
tested per stage in tests/stages (test_stage_learners, test_stage_ppo_learner).
"""

from __future__ import annotations

import json

import pytest
from test_pipe_run import FAST, TINY  # a sibling test module (tests/pipeline is on sys.path)

from launch.cli import main


@pytest.mark.slow  # ~140 s on 2 cores, with the data and base model built into a fresh cache
@pytest.mark.timeout(600)
def test_one_ray_worker_runs_all_three_learner_stages(tmp_path):
    run_dir = tmp_path / "ray1"
    code = main(["run", "--config", TINY, f"run.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}", *FAST,
                 "ray.num_workers=1", "ray.num_cpus=2", "ray.address=local", "--no-progress", "--json"])
    assert code == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed" and set(report["stages"]) == {"sft", "rm", "ppo"}
    for name in ("sft", "rm", "ppo"):
        summary = json.loads((run_dir / "stages" / f"{name}.done").read_text())["summary"]
        assert summary["learner_workers"] == 1, name
        sp = report["stages"][name]["privacy"]
        assert 0 < sp["epsilon_spent"] <= sp["target_epsilon"], name
    ppo = json.loads((run_dir / "stages" / "ppo" / "summary.json").read_text())
    assert ppo["steps"] == 2 and ppo["rollout"]["ray_actors"] == 0
    assert main(["privacy", "verify", str(run_dir)]) == 0  # the ledger, written through the sink actor, verifies

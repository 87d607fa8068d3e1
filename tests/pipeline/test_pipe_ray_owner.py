"""One owner of Ray: the run starts Ray from ``cfg.ray`` and the PPO rollout actors live inside it.

In a fresh process (no other Ray to attach to): the pipeline's Ray start honours ``ray.num_cpus``; the rollout
actors join that Ray rather than starting their own, reserve ``ppo.rollout_cpus_per_actor`` CPUs each, and their
shutdown leaves the run's Ray up for the run to stop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from cluster.runtime import shutdown_ray
    from launch.config import load_config
    from launch.pipeline.pipeline import _start_ray
    from launch.schema import RunConfig
    from trainers.models.tokenizer import train_tokenizer
    from trainers.stages.ppo import _Rollouts

    model_dir = sys.argv[1]
    tok = train_tokenizer(["a tiny corpus for a tiny model"] * 20, vocab_size=280, min_frequency=1)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=32)
    config.eos_token_id = config.bos_token_id = config.pad_token_id = tok.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    cfg = load_config(RunConfig, None, ["ray.address=local", "ray.num_cpus=5", "ppo.rollout_actors=2",
                                        "ppo.rollout_cpus_per_actor=2"])
    started = _start_ray(cfg)              # what the pipeline does before a stage that needs Ray
    import ray
    out = {"started_by_run": started, "cpus": ray.cluster_resources().get("CPU")}
    rollouts = _Rollouts(None, sft_dir=model_dir, cfg=cfg.ppo, use_ray=True, ray_cfg=cfg.ray)
    out["actors_started_ray"] = rollouts._started_ray
    import time
    ray.get([actor.__ray_ready__.remote() for actor in rollouts.group.group.actors])  # both actors placed
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0.0) != 1.0 and time.time() < deadline:
        time.sleep(0.2)  # the resource view follows the placement with a short delay
    out["free_with_actors"] = ray.available_resources().get("CPU", 0.0)
    rollouts.shutdown()
    out["ray_up_after_actors"] = ray.is_initialized()
    shutdown_ray()
    out["ray_up_after_run"] = ray.is_initialized()
    print(json.dumps(out))
''')


@pytest.mark.heavy(24)
def test_rollout_actors_run_in_the_runs_ray_with_the_configured_resources(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "model")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"started_by_run": True, "cpus": 5.0, "actors_started_ray": False, "free_with_actors": 1.0,
                   "ray_up_after_actors": True, "ray_up_after_run": False}, got

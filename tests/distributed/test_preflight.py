"""Preflight on a real 2-node Ray cluster (one machine, two `ray start` processes): the second node runs in its own
mount namespace where the driver's model cache is an empty tmpfs -- a node that cannot see the driver's local
disk. The run must stop before the ledger records anything, naming the node, the path and the field; with the
cache on a path both nodes see, the same run passes the preflight and completes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.ray_nodes import head_node, worker_node

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "launch" / "configs" / "tiny.yaml")
pytestmark = pytest.mark.slow


def _run(head, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.cli", "run", "--config", TINY, "--no-progress",
           f"ray.address={head['gcs']}", "ray.num_workers=1", "ppo.rollout_actors=1", *args]
    return subprocess.run(cmd, cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=900)


@pytest.mark.timeout(1500)
def test_a_node_that_cannot_see_the_cache_stops_the_run_before_any_release(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to hide a path from one node")
    hidden, shared, out = tmp_path / "local-cache", tmp_path / "shared-cache", tmp_path / "runs"
    hidden.mkdir()
    with head_node(num_cpus=2) as head, worker_node(head, num_cpus=2, hide=hidden):
        refused = _run(head, f"run.cache_dir={hidden}", f"run.out_dir={out}")
        assert refused.returncode == 2, refused.stderr[-3000:]
        err = refused.stderr
        assert "preflight" in err and "before any privacy was spent" in err and "run.cache_dir" in err
        assert str(hidden) in err and "does not exist on this node" in err
        assert not out.exists() or not any(out.iterdir())  # no run directory, so no ledger event
        ok = _run(head, f"run.cache_dir={shared}", f"run.out_dir={out}", "--json")
        assert ok.returncode == 0, ok.stderr[-3000:]
        summary = json.loads(ok.stdout.strip().splitlines()[-1])
        assert summary["status"] == "completed"
        run_dir = Path(summary["run_dir"])
        verify = subprocess.run([sys.executable, "-m", "launch.cli", "privacy", "verify", str(run_dir)], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert verify.returncode == 0, verify.stdout + verify.stderr

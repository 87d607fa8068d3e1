"""`ray job submit` against a real head (`ray start --head --block`), as the README's cluster recipe does it.

The head runs in its own process group with its own --temp-dir and ports, and is stopped by that group's id
(never by name, so a user's own Ray is never touched). The jobs run the tiny pipeline from an uploaded working
directory, with a Ray Train learner and without one; the run directory must be where the job says (absolute,
outside Ray's temporary directories) and verify with the ledger alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.ray_nodes import RAY, head_node

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    """A real Ray head with the job server on 127.0.0.1; yields (dashboard address, env, temp dir)."""
    with head_node(num_cpus=4) as info:
        yield info["dashboard"], info["env"], info["temp"]


def _submit(head, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    address, env, _ = head
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           "python", "-m", "launch.cli", "run", "--config", "launch/configs/tiny.yaml", "--no-progress", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _run_dir_from(output: str) -> Path:
    lines = [ln for ln in output.splitlines() if ln.startswith("run ")]
    assert lines, output[-3000:]
    return Path(lines[-1].split()[1])


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("workers", [1, 0])
def test_job_runs_the_pipeline_and_its_outputs_survive(head, tmp_path_factory, workers):
    out = tmp_path_factory.mktemp(f"job-runs-{workers}")
    cache = tmp_path_factory.getbasetemp() / "job-cache"  # shared by both jobs: the second reuses the base model
    proc = _submit(head, f"run.out_dir={out}", f"run.cache_dir={cache}", f"ray.num_workers={workers}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout.lower()
    run_dir = _run_dir_from(proc.stdout)
    assert run_dir.is_absolute() and run_dir.parent == out and run_dir.is_dir()
    assert str(head[2]) not in str(run_dir) and "runtime_resources" not in str(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed"
    assert report["stages"]["sft"]["privacy"]["epsilon_spent"] > 0
    verify = subprocess.run([sys.executable, "-m", "launch.cli", "privacy", "verify", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.timeout(600)
def test_job_with_outputs_in_rays_temporary_copy_is_refused_before_anything_runs(head):
    proc = _submit(head, timeout=300)  # run.out_dir=runs: relative to Ray's copy of the working directory
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "inside Ray's temporary copy of the job's working directory" in text and "run.out_dir" in text

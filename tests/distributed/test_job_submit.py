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


def _ledger_steps(run_dir: Path, stage: str) -> list[int]:
    path = run_dir / "ledger.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r.get("stage") == stage and "step" in r and "sampling_rate" in r]


def _wait_for_run_dir(out: Path, proc_or_none, *, timeout: float = 600) -> Path:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        dirs = [d for d in out.iterdir() if d.is_dir()] if out.is_dir() else []
        if dirs:
            return dirs[0]
        if proc_or_none is not None and proc_or_none.poll() is not None:
            raise AssertionError(f"the job ended before making its run directory: {proc_or_none.stdout.read()}")
        time.sleep(0.5)
    raise AssertionError("no run directory appeared")


def _wait_for_steps(run_dir: Path, stage: str, n: int, *, timeout: float = 900) -> None:
    import time

    deadline = time.time() + timeout
    while len(_ledger_steps(run_dir, stage)) < n:
        assert time.time() < deadline, f"stage {stage!r} did not record {n} steps in time"
        time.sleep(0.2)


def _verify(run_dir: Path) -> None:
    verify = subprocess.run([sys.executable, "-m", "launch.cli", "privacy", "verify", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


SFT_STEPS = 40  # long enough to strike mid-stage on a loaded machine
DRIVER_SFT_STEPS = 300  # `ray job stop` itself takes seconds to start and to stop the driver: a longer stage


@pytest.mark.timeout(1800)
def test_a_killed_ray_train_worker_restarts_and_the_stage_resumes_at_the_ledgers_count(head, tmp_path):
    """SIGKILL of the Ray Train worker (its pid from the head's state API) mid-SFT: ray.max_failures=1 restarts
    the group, which resumes after the last step on the ledger. The job succeeds, no step is on the ledger twice,
    none is missing, and the ledger verifies."""
    import os
    import signal

    address, env, _ = head
    out = tmp_path / "runs"
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", "python", "-m",
           "launch.cli", "run", "--config", "launch/configs/tiny.yaml", "--no-progress", f"run.out_dir={out}",
           f"run.cache_dir={tmp_path / 'cache'}", "ray.num_workers=1", "ray.max_failures=1",
           "run.checkpoint_every=2", f"sft.steps={SFT_STEPS}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_dir = _wait_for_run_dir(out, proc)
        _wait_for_steps(run_dir, "sft", 3)
        listed = subprocess.run([RAY, "list", "actors", "--address", address, "--filter", "class_name=RayTrainWorker",
                                 "--filter", "state=ALIVE", "--format", "json"], env=env, capture_output=True,
                                text=True, timeout=120)
        workers = json.loads(listed.stdout)
        assert len(workers) == 1, listed.stdout + listed.stderr
        os.kill(int(workers[0]["pid"]), signal.SIGKILL)  # the learner, mid-stage
        killed_after = len(_ledger_steps(run_dir, "sft"))
        stdout, _ = proc.communicate(timeout=1500)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-4000:]
    assert killed_after < SFT_STEPS, "the kill came after the stage: nothing was tested"
    steps = _ledger_steps(run_dir, "sft")
    assert steps == list(range(SFT_STEPS)), steps  # every planned step once: none retaken, none lost from the ledger
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed"
    _verify(run_dir)


@pytest.mark.timeout(1800)
def test_a_stopped_job_driver_is_resumed_by_a_new_job_with_run_resume(head, tmp_path):
    """The job's driver is stopped mid-SFT (``ray job stop``); ``dpalign run --resume RUN_DIR`` submitted as a new
    job finishes the run in the same directory: the ledger keeps every step the first job recorded, never records
    a step twice, and verifies."""
    import time

    address, env, _ = head
    out = tmp_path / "runs"
    job_id = f"dpalign-driver-kill-{int(time.time())}"
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--submission-id", job_id,
              "--no-wait", "--", "python", "-m", "launch.cli", "run", "--config", "launch/configs/tiny.yaml",
              "--no-progress", f"run.out_dir={out}", f"run.cache_dir={tmp_path / 'cache'}", "ray.num_workers=1",
              "run.checkpoint_every=2", f"sft.steps={DRIVER_SFT_STEPS}"]
    first = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir = _wait_for_run_dir(out, None)
    _wait_for_steps(run_dir, "sft", 2)
    stop = subprocess.run([RAY, "job", "stop", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    before = _ledger_steps(run_dir, "sft")
    assert len(before) < DRIVER_SFT_STEPS, "the driver was stopped after the stage: nothing was tested"
    assert not (run_dir / "report.json").exists()

    resume = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                             "python", "-m", "launch.cli", "run", "--resume", str(run_dir), "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=1500)
    assert resume.returncode == 0, (resume.stdout + resume.stderr)[-4000:]
    assert _run_dir_from(resume.stdout) == run_dir
    steps = _ledger_steps(run_dir, "sft")
    assert steps[: len(before)] == before and len(set(steps)) == len(steps) == DRIVER_SFT_STEPS, steps
    assert json.loads((run_dir / "report.json").read_text())["status"] == "completed"
    _verify(run_dir)

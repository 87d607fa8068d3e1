"""Real Ray nodes for the cluster tests: `ray start --block` in its own process group, own temp dir and ports,
stopped by that group's id (never by name). A worker node may run in its own mount namespace, where a path of the
driver's machine is hidden behind an empty tmpfs: a node that cannot see the driver's cache, on one machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the node's own process group: raylet, GCS, workers
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def head_node(*, num_cpus: int = 4) -> Iterator[dict[str, object]]:
    """A head with the job server on 127.0.0.1; yields {"gcs", "dashboard", "env", "temp"}."""
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dash, env = free_port(), free_port(), ray_env()
    cmd = [RAY, "start", "--head", "--block", "--temp-dir", str(temp), "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", str(num_cpus),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--min-worker-port", "20000", "--max-worker-port", "20999", "--disable-usage-stats"]
    log = open(temp / "head.log", "w")  # noqa: SIM115 -- closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    info = {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env, "temp": temp}
    try:
        deadline = time.time() + 120
        while subprocess.run([RAY, "job", "list", "--address", info["dashboard"]], env=env, capture_output=True,
                             timeout=60).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head did not start: {(temp / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield info
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@contextmanager
def worker_node(head: dict[str, object], *, num_cpus: int = 2, hide: Path | None = None) -> Iterator[None]:
    """A second node joining ``head``; with ``hide``, in a mount namespace where ``hide`` is an empty tmpfs."""
    env = dict(head["env"])  # type: ignore[arg-type]
    start = [RAY, "start", "--block", "--address", str(head["gcs"]), "--num-cpus", str(num_cpus),
             "--dashboard-agent-listen-port", str(free_port()), "--min-worker-port", "21000",
             "--max-worker-port", "21999", "--disable-usage-stats"]
    if hide is not None:
        script = f"mount -t tmpfs tmpfs {hide} && exec " + " ".join(start)
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    else:
        cmd = start
    log_path = Path(head["temp"]) / "worker.log"  # type: ignore[arg-type]
    log = open(log_path, "w")  # noqa: SIM115 -- closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        probe = (f"import ray, json; ray.init(address='{head['gcs']}', logging_level='ERROR'); "
                 "print(json.dumps(len([n for n in ray.nodes() if n['Alive']])))")
        deadline = time.time() + 120
        while True:
            out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=90)
            if out.returncode == 0 and json.loads(out.stdout.strip().splitlines()[-1]) >= 2:
                break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the worker node did not join: {log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield
    finally:
        _stop(proc)
        log.close()

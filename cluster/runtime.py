"""Starting and joining Ray: one entry for the embedded single-machine default and for `ray job submit`.

The same `dpalign run` runs unchanged in three places:
  * on a laptop or CI box: no RAY_ADDRESS, so :func:`init_ray` starts an embedded Ray in this process (no dashboard,
    auth token disabled, quiet logs, ``num_cpus`` as configured);
  * as a Ray job (`ray job submit -- dpalign run ...`): the job supervisor sets RAY_ADDRESS, and :func:`init_ray`
    joins that cluster, leaving its auth, dashboard and resources alone;
  * with an explicit address from the config (``ray.address``: 'auto', 'host:port', 'ray://host:10001').

Ray is imported inside the functions so that importing ``cluster`` costs nothing where Ray is not needed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil

log = logging.getLogger(__name__)

# The head processes (GCS, raylet, monitors) of the embedded Ray this process started, found as this process's new
# children across ray.init: shutdown_ray reaps their whole tree by pid, never by name.
_EMBEDDED_HEADS: list[psutil.Process] = []


@dataclass(frozen=True)
class RayRuntime:
    """What :func:`init_ray` connected to.

    Attributes:
        address: the GCS address of the cluster (embedded: this machine's).
        embedded: True when this process started Ray itself (no cluster address given).
        started_here: True when this call (not an earlier one) ran ``ray.init``; :func:`shutdown_ray` only stops
            a Ray that this process started.
        cpus: CPUs the cluster advertises.
    """

    address: str
    embedded: bool
    started_here: bool
    cpus: float


def resolve_address(address: str | None) -> str | None:
    """The cluster address to join, or None for an embedded Ray.

    Precedence: an explicit non-empty ``address`` (config ``ray.address``); then RAY_ADDRESS (set by
    `ray job submit`); else None. 'local' forces an embedded Ray even when RAY_ADDRESS is set.
    """
    if address == "local":
        return None
    if address:
        return address
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return env or None


def init_ray(
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    namespace: str | None = None,
    log_to_driver: bool = True,
    logging_level: int = logging.WARNING,
) -> RayRuntime:
    """Start an embedded Ray or join a cluster; a no-op returning the current runtime if Ray is already up.

    Args:
        address: cluster to join ('' or None: RAY_ADDRESS if set, else embedded; 'local': embedded always).
        num_cpus: embedded Ray only: CPUs to offer (None or 0: all cores). Ignored when joining a cluster, whose
            resources are its own.
        num_gpus: embedded Ray only: GPUs to offer (None: autodetect).
        runtime_env: Ray runtime environment (pip packages, env_vars, working_dir) for the workers. A job
            submitted with its own runtime_env usually needs none here.
        namespace: Ray namespace (named actors are looked up within it).
        log_to_driver: forward worker stdout/stderr to this process (errors in learners show up here).
        logging_level: Ray's own log level (WARNING keeps the driver's output readable).

    Raises:
        ValueError: num_cpus < 0.
    """
    import ray

    if num_cpus is not None and num_cpus < 0:
        raise ValueError(f"num_cpus={num_cpus}: must be >= 0 (0 or None: all cores)")
    target = resolve_address(address)
    if ray.is_initialized():
        return _describe(ray, embedded=target is None, started_here=False)

    kwargs: dict[str, Any] = {
        "logging_level": logging_level,
        "log_to_driver": log_to_driver,
        "namespace": namespace,
        "runtime_env": dict(runtime_env) if runtime_env else None,
    }
    if target is None:
        # Ray 2.60 otherwise generates an auth token under ~/.ray for a new local cluster; an embedded Ray that
        # only this process talks to needs none. A user who exported RAY_AUTH_MODE keeps their choice.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # An embedded Ray must not silently join whatever RAY_ADDRESS points at ('local' was asked for).
        os.environ.pop("RAY_ADDRESS", None)
        kwargs.update(
            # 'local' starts a new Ray even when a stale head left its address file behind (without it,
            # ray.init() attaches to that cluster and then rejects num_cpus).
            address="local",
            num_cpus=num_cpus or None,
            num_gpus=num_gpus,
            include_dashboard=False,
        )
    else:
        kwargs["address"] = target
    before = {c.pid for c in psutil.Process().children()}
    ray.init(**kwargs)
    if target is None:
        _EMBEDDED_HEADS[:] = [c for c in psutil.Process().children() if c.pid not in before]
    return _describe(ray, embedded=target is None, started_here=True)


def _describe(ray: Any, *, embedded: bool, started_here: bool) -> RayRuntime:
    context = ray.get_runtime_context()
    address = getattr(context, "gcs_address", "") or ""
    return RayRuntime(
        address=address,
        embedded=embedded,
        started_here=started_here,
        cpus=float(ray.cluster_resources().get("CPU", 0.0)),
    )


def shutdown_ray(*, grace_s: float = 10.0) -> None:
    """Disconnect from Ray (an embedded Ray stops with it). Safe to call twice or without Ray up.

    An embedded Ray's processes are then reaped: every process of its tree (head processes, workers, actors and
    what they started), snapshotted before the shutdown, gets ``grace_s`` seconds to exit and is then killed by
    pid. Ray stops them itself almost always; on a loaded machine a Ray Train controller actor was once seen
    surviving its raylet, orphaned, for good. A joined cluster's processes are not this process's and are left alone.
    """
    try:
        import ray
    except ImportError:
        return
    tree = _process_tree(_EMBEDDED_HEADS)
    _EMBEDDED_HEADS.clear()
    if ray.is_initialized():
        ray.shutdown()
    survivors = reap(tree, grace_s=grace_s)
    if survivors:
        log.warning("embedded Ray: killed %d process(es) that outlived ray.shutdown(): pids %s",
                    len(survivors), survivors)


def _process_tree(roots: Sequence[psutil.Process]) -> list[psutil.Process]:
    """``roots`` still running and all their descendants (a root whose pid was reused is not ours: skipped)."""
    tree: list[psutil.Process] = []
    for root in roots:
        try:
            if root.is_running():
                tree += [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
    return tree


def reap(procs: Sequence[psutil.Process], *, grace_s: float) -> list[int]:
    """Wait up to ``grace_s`` for ``procs`` to exit, SIGKILL those still running; return the pids killed.

    psutil refuses to signal a process whose pid was reused since the snapshot, so only the snapshot's own
    processes can be killed. A zombie counts as exited: once its raylet is gone a Ray worker is an orphan, and
    where PID 1 does not reap (some containers) it stays a zombie forever, dead but listed.
    """
    alive = _wait_gone(procs, timeout=grace_s)
    killed = []
    for p in alive:
        try:
            p.kill()
            killed.append(p.pid)
        except psutil.Error:  # exited meanwhile, or the pid now belongs to another process
            continue
    _wait_gone(alive, timeout=5.0)
    return killed


def _wait_gone(procs: Sequence[psutil.Process], *, timeout: float) -> list[psutil.Process]:
    """Poll until every process has exited (or is a zombie) or ``timeout`` passes; return those still running."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while True:
        alive = [p for p in alive if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextmanager
def ray_session(**kwargs: Any) -> Iterator[RayRuntime]:
    """``with ray_session(num_cpus=2) as rt:`` runs :func:`init_ray` and shuts Ray down on exit if this call
    started it (a session joined from an outer caller is left running)."""
    runtime = init_ray(**kwargs)
    try:
        yield runtime
    finally:
        if runtime.started_here:
            shutdown_ray()

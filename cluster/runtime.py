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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


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
    ray.init(**kwargs)
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


def shutdown_ray() -> None:
    """Disconnect from Ray (an embedded Ray stops with it). Safe to call twice or without Ray up."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


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

"""Preflight on every node of a Ray cluster, before any privacy is spent: can each node read and write what the run
needs there?

Why: Ray Train learners and rollout actors may land on any node. They read the base model (and the SFT model)
from the run's cache and run directory, and rank 0 writes checkpoints into the run directory. On a cluster without
shared storage those paths exist only on the driver's node, and the failure would come mid-stage -- after the
ledger has recorded releases. This check runs one tiny task pinned to each alive node (0 CPUs) and reports, per
node, each path it cannot read or write, with the config field to change.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any


class PreflightError(RuntimeError):
    """A node of the cluster cannot reach a path the run needs (message: node, path, field, fix)."""


@dataclass(frozen=True)
class PathNeed:
    """A path every node must reach: ``mode`` "read" (exists and is readable) or "write" (a file can be created
    in it; the directory is created if missing where its parent is writable). ``field`` names the config field."""

    path: str
    mode: str
    field: str


def check_paths_here(needs: list[PathNeed]) -> list[str]:
    """The problems of this process's node with ``needs`` (empty: all reachable). Runs on each node."""
    problems = []
    for need in needs:
        path = need.path
        if need.mode == "read":
            if not os.path.exists(path):
                problems.append(f"cannot read {path} ({need.field}): it does not exist on this node")
            elif not os.access(path, os.R_OK):
                problems.append(f"cannot read {path} ({need.field}): permission denied")
            elif os.path.isdir(path) and not os.listdir(path):
                problems.append(f"cannot read {path} ({need.field}): the directory is empty on this node")
            continue
        probe = os.path.join(path, f".dpalign-preflight-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(path, exist_ok=True)
            with open(probe, "w") as fh:
                fh.write("ok")
            os.remove(probe)
        except OSError as err:
            problems.append(f"cannot write in {path} ({need.field}): {err.strerror or err}")
    return problems


def preflight_nodes(needs: list[PathNeed], *, timeout_s: float = 120.0) -> dict[str, list[str]]:
    """``{node: problems}`` for every alive node of the connected Ray cluster whose check failed.

    Ray must be up (``cluster.runtime.init_ray``). Each check is a 0-CPU task with a hard node affinity, so it runs
    even on a full cluster and never on another node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0, max_retries=0)(check_paths_here)
    pending: dict[Any, str] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        label = f"{node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"
        strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
        pending[check.options(scheduling_strategy=strategy).remote(needs)] = label
    results = ray.get(list(pending), timeout=timeout_s)
    return {pending[ref]: problems for ref, problems in zip(pending, results, strict=True) if problems}


def require_reachable(needs: list[PathNeed], *, timeout_s: float = 120.0) -> None:
    """:func:`preflight_nodes`, raising :class:`PreflightError` that lists every node, path and field."""
    failed = preflight_nodes(needs, timeout_s=timeout_s)
    if not failed:
        return
    lines = [f"node {node}: {p}" for node, problems in failed.items() for p in problems]
    fields = sorted({n.field for n in needs if any(f"({n.field})" in line for line in lines)})
    raise PreflightError(
        "preflight: learners or actors may run on nodes that cannot reach the run's files, so the run stopped "
        "before any privacy was spent:\n  " + "\n  ".join(lines) + "\nPut " + ", ".join(fields) + " on storage "
        "every node mounts at the same path (NFS, EFS, a Kubernetes PVC), or run with ray.num_workers=0 and "
        "ppo.rollout_actors=0 (everything in the driver)"
    )

"""`dpalign controller`: pretrain a clip/noise controller on PUBLIC proxy fine-tuning (no privacy cost), or show
an artifact.

  dpalign controller pretrain [--config FILE] [key=value ...]   train (RLlib SAC over Ray env runners by default,
                                                                or controller.pretrain_trainer=sb3 in-process) and
                                                                write the artifact to controller.out
  dpalign controller show PATH                                  print an artifact's spaces (granularity, groups),
                                                                actor and provenance (stage, budget, steps, source
                                                                run); PATH may be a run's RUN_DIR/controller

Ray: embedded by default (ray.num_cpus CPUs); inside `ray job submit` (RAY_ADDRESS set) or with ray.address=... it
joins the cluster, and the env runners spread over it. Reuse the artifact in a run with controller.load=PATH and
controller.mode=frozen|finetune.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from controller.config import ControllerConfig
from launch.commands._common import add_config_args, load_run_config


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "controller",
        help="pretrain a learned clip/noise controller on public data, or inspect an artifact",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="controller_command", required=True)
    pre = sub.add_parser(
        "pretrain", help="train on proxy DP fine-tuning of public text and write an artifact"
    )
    add_config_args(pre)
    pre.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    show = sub.add_parser("show", help="print an artifact's spec and provenance")
    show.add_argument("path", help="artifact directory")
    parser.set_defaults(func=main)


def _describe(path: Path) -> dict[str, Any]:
    from controller.artifact import load_artifact

    art = load_artifact(path)
    spec = art.spec
    return {
        "path": str(path),
        "granularity": spec.granularity,
        "slots": spec.slots,
        "obs_dim": spec.obs_dim,
        "act_dim": spec.act_dim,
        "spec": spec.to_dict(),
        "actor_hidden": art.actor.hidden,
        "provenance": asdict(art.provenance),
        "has_sb3_state": art.sb3_dir is not None,
    }


def _show(path_arg: str) -> int:
    """One artifact, or a run's RUN_DIR/controller (one artifact per stage, printed by stage)."""
    from controller.artifact import ARTIFACT_FILE

    path = Path(path_arg)
    if (path / ARTIFACT_FILE).is_file():
        print(json.dumps(_describe(path), indent=2))
        return 0
    stages = sorted(p for p in path.iterdir() if (p / ARTIFACT_FILE).is_file()) if path.is_dir() else []
    if not stages:
        print(
            f"dpalign controller show: {path}: no {ARTIFACT_FILE} there nor in a stage sub-directory; give an "
            "artifact directory or a run's RUN_DIR/controller",
            file=sys.stderr,
        )
        return 2
    print(json.dumps({p.name: _describe(p) for p in stages}, indent=2))
    return 0


def main(args: argparse.Namespace) -> int:
    if args.controller_command == "show":
        return _show(args.path)

    cfg = load_run_config(args)
    ctrl: ControllerConfig = cfg.controller
    ctrl.check()
    if ctrl.granularity != "bucket":
        # a module / lora_param actor has one slot per clipping group of the model it runs on: the proxy model's
        # groups are no real run's, so such an artifact could never be loaded; learn those online instead
        print(
            f"dpalign controller pretrain: controller.granularity={ctrl.granularity}: pretraining on the proxy "
            "task writes bucket artifacts only (module / lora_param spaces fit one model's groups); set "
            "controller.granularity=bucket, or learn a per-group controller online in a run and reuse its "
            "RUN_DIR/controller",
            file=sys.stderr,
        )
        return 2
    import time

    start = time.time()
    if ctrl.pretrain_trainer == "sb3":
        from controller.artifact import Provenance
        from controller.env import ProxyDPEnv
        from controller.sb3 import train_sb3

        env = ProxyDPEnv(ctrl.env, ctrl.spec())
        provenance = Provenance(
            trainer="sb3",
            model_layers=[ctrl.env.n_layer],
            model_width=ctrl.env.n_embd,
            epsilons=list(ctrl.env.target_epsilons),
            delta=ctrl.env.delta,
            steps=ctrl.env.steps,
            reward=ctrl.env.reward,
        )
        _, curve = train_sb3(
            env, config=ctrl, episodes=ctrl.pretrain_iterations, provenance=provenance, out=ctrl.out
        )
        path = ctrl.out
    else:
        from cluster.runtime import ray_session
        from controller.rllib import pretrain_rllib

        with ray_session(address=cfg.ray.address or None, num_cpus=cfg.ray.num_cpus or None):
            path, curve = pretrain_rllib(ctrl, out=ctrl.out)
    summary = {
        "artifact": str(path),
        "trainer": ctrl.pretrain_trainer,
        "iterations": len(curve),
        "training_curve": [round(c, 4) for c in curve],
        "seconds": round(time.time() - start, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k}: {v}")
    return 0

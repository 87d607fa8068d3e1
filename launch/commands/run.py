"""`dpalign run`: the whole private alignment pipeline from one command.

data -> base model (cached) -> DP-SFT (D1) -> DP reward model (D2) -> DP-PPO (D3) -> evaluation -> report.
Leaves in the run directory: config.yaml, ledger.jsonl, stages/<name>/ (adapters, merged exports), tb/,
metrics.jsonl, report.json, report.md and plots/. `--resume RUN_DIR` continues a crashed run: finished stages are
not rerun and the ledger is never rolled back. Works unchanged as a Ray job (`ray job submit -- dpalign run ...`,
RAY_ADDRESS set by Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from launch.commands._common import add_config_args, load_run_config


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the private pipeline (SFT -> reward model -> PPO) end to end and write a report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue a crashed run (its config.yaml is used unless --config is given)")
    parser.add_argument("--json", action="store_true", help="print report.json's summary as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.resume and args.config is None:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            print(f"dpalign run: --resume {args.resume}: no config.yaml there; is it a run directory?", file=sys.stderr)
            return 2
        args.config = str(saved)
    cfg = load_run_config(args)
    from launch.paths import check_outputs_outlive_the_job

    problem = check_outputs_outlive_the_job(cfg)
    if problem is not None:
        print(f"dpalign run: {problem}", file=sys.stderr)
        return 2
    if not os.environ.get("RAY_ADDRESS"):
        # Embedded Ray on this machine: Ray 2.60 would otherwise write an auth token under ~/.ray.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from cluster.preflight import PreflightError
    from controller.reuse import ControllerReuseError
    from launch.pipeline.pipeline import run_pipeline
    from launch.pipeline.rundir import RunDirError
    from trainers.data.io import DataError
    from trainers.stages.config import CompositionError, PlanError

    try:
        report = run_pipeline(cfg, resume=args.resume, progress=not args.no_progress)
    except (DataError, CompositionError, PlanError, PreflightError, RunDirError,
            ControllerReuseError) as err:  # before any privacy
        print(f"dpalign run: {err}", file=sys.stderr)
        return 2
    summary = summarize(report)
    if args.json:
        print(json.dumps(summary))
    else:
        print(render(summary))
    return 0


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The printed summary: per-stage status, epsilon and wall time; gold reward of base/SFT/final."""
    privacy = report.get("privacy") or {}
    pols = report["evaluation"]["policies"]
    base = report.get("base_model") or {}
    return {
        "run_dir": report.get("_run_dir"),
        "task": report.get("task"),
        "base_model": base,
        "status": report["status"],
        "preset": report["preset"],
        "noise_warning": report["noise"]["warning"],
        "epsilon": privacy.get("epsilon"),
        "delta": privacy.get("delta"),
        "accountant": privacy.get("accountant"),
        "composition": privacy.get("composition"),
        "stages": {
            name: {
                "status": e["status"],
                "private": e["private"],
                "epsilon": (e["privacy"] or {}).get("epsilon_spent"),
                "target_epsilon": (e["privacy"] or {}).get("target_epsilon"),
                "wall_time_s": None if e["wall_time_s"] is None else round(e["wall_time_s"], 1),
            }
            for name, e in report["stages"].items()
        },
        "gold_reward": {name: p["gold_reward"] for name, p in pols.items()},
        "kl_to_sft": {name: p["kl_to_sft"] for name, p in pols.items()},
        "perplexity": {name: p["perplexity"] for name, p in pols.items()},
        "reward_model_accuracy": (report["evaluation"].get("reward_model") or {}).get("accuracy"),
        "wall_time_s": {k: round(v, 1) for k, v in report["wall_time_s"].items()},
    }


def render(s: dict[str, Any]) -> str:
    lines = [f"run      {s['run_dir']}  ({s['preset']}, {s['status']})"]
    task = s.get("task") or {}
    if task:
        users = task["users"]
        lines.append("users    " + ", ".join(f"{k} {v}" for k, v in users.items())
                     + ("  (no user_id column: each record is its own user in " + ", ".join(task["per_record_users"]) + ")"
                        if task.get("per_record_users") else ""))
    base = s.get("base_model") or {}
    if base.get("perplexity") is not None:
        lines.append(f"base     {base['params']:,} parameters; held-out perplexity {base['perplexity']:.2f} vs unigram "
                     f"{base['unigram_perplexity']:.2f} ({'built' if base['built'] else 'from the cache'})")
    if s["epsilon"] is not None:
        lines.append(f"privacy  epsilon {s['epsilon']:.3f} at delta {s['delta']:.2e} ({s['accountant']}, "
                     f"{s['composition']} composition)")
    for name, st in s["stages"].items():
        eps = f"epsilon {st['epsilon']:.3f} / {st['target_epsilon']:g}" if st["epsilon"] is not None else "not private"
        wall = f"{st['wall_time_s']:7.1f} s" if st["wall_time_s"] is not None else "  (time not published)"
        lines.append(f"  {name:4s}   {st['status']:9s} {eps:28s} {wall}")
    for name, g in s["gold_reward"].items():
        kl = s["kl_to_sft"][name]
        ppl = s["perplexity"][name]
        lines.append(
            f"  {name:6s} gold reward {g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"
            + (f"  KL to SFT {kl:.3f}" if kl is not None else "")
            + (f"  ppl {ppl:.2f}" if ppl is not None else "")
        )
    if s["reward_model_accuracy"] is not None:
        lines.append(f"  reward model accuracy on public gold pairs: {s['reward_model_accuracy']:.3f}")
    total = s["wall_time_s"].get("total")
    lines.append((f"wall time {total:.1f} s  " if total is not None else "wall time (public phases) ") + ", ".join(
        f"{k} {v:.1f}" for k, v in s["wall_time_s"].items() if k != "total"))
    if s.get("noise_warning"):
        lines.insert(0, f"WARNING  {s['noise_warning']}")
        lines.append(f"WARNING  {s['noise_warning']}")
    return "\n".join(lines)

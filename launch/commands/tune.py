"""`dpalign tune`: a Ray Tune study over full private-pipeline trials, with the study's own privacy cost on its
ledger (launch/study.py). Modes: public_proxy (trials on a public proxy population, the chosen config run once
on the private data; tuning costs nothing), repeat_and_select (a secret random number of private trials, only the
best released; Papernot & Steinke via dp-accounting's RepeatAndSelectDpEvent) and compose (trials on the private
data, all published and composed).

  dpalign tune --config launch/configs/tune-tiny.yaml [study.key=value ...]
  dpalign tune --resume STUDY_DIR            finish a study whose driver died (Tuner.restore)
  dpalign tune --help-config                 every study field with its meaning
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from launch.commands._common import add_config_args


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tune", help="Ray Tune budget-allocation study (public proxy, repeat-and-select or composed), cost on a ledger",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser, "the study config")
    parser.add_argument("--resume", metavar="STUDY_DIR", default=None, help="finish a study (its study.yaml is used)")
    parser.add_argument("--json", action="store_true", help="print the study's summary as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="quieter output")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from launch.config import ConfigError, format_help, load_config
    from launch.study import StudyConfig, run_study

    if getattr(args, "help_config", False):
        print(format_help(StudyConfig))
        return 0
    if args.resume and args.config is None:
        saved = Path(args.resume) / "study.yaml"
        if not saved.is_file():
            print(f"dpalign tune: --resume {args.resume}: no study.yaml there; is it a study directory?",
                  file=sys.stderr)
            return 2
        args.config = str(saved)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        cfg = load_config(StudyConfig, args.config, args.overrides)
        report = run_study(cfg, resume=args.resume, progress=not args.no_progress)
    except ConfigError as err:
        print(f"dpalign tune: config error: {err}", file=sys.stderr)
        return 2
    summary = {
        "study_dir": str(Path(cfg.study.dir)),
        "mode": report["mode"],
        # repeat_and_select: how many trials ran is part of the secret (STUDY_DIR's private record has it)
        "trials": len(report["trials"]) if report["mode"] != "repeat_and_select" else "withheld",
        "best": report["best"]["overrides"] if report["best"] else None,
        "best_" + report["metric"]: report["best"][report["metric"]] if report["best"] else None,
        "study_epsilon": report["privacy"]["epsilon"],
        "study_delta": report["privacy"]["delta"],
        "final": report["final"],
        "release": report.get("release"),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k}: {v}")
    return 0

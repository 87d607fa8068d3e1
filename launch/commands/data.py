"""`dpalign data`: build (or reuse from the cache) the task's data, or validate your files, and summarize it.

Prints split sizes, users per private split (and how many are shared across stages), distinct words in the public
corpus, the mean gold reward (VADER) of the D1 responses, the canaries, and the cache directory. With
``data.source=files`` every file is validated (missing file, missing column, empty text, bad user_id) and the
first problem is reported with its file, row and fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from launch.commands._common import add_config_args, load_run_config


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data",
        help="build (or reuse) the task's data, or validate your own files, and print a summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    parser.set_defaults(func=main)


def summarize(task: Any) -> dict[str, Any]:
    """The printed summary of a :class:`trainers.data.task.TaskData` (plain data, JSON-ready)."""
    return {
        "root": task.root,
        "built": task.built,
        "counts": task.counts,
        "users": task.users,
        "per_record_users": list(task.per_record_users),
        "canaries": len(task.canaries),
        "stats": task.stats,
        "files": {
            name: getattr(task, name) for name in ("public_train", "public_valid", "sft", "rm", "ppo", "eval")
        },
    }


def main(args: argparse.Namespace) -> int:
    cfg = load_run_config(args)

    from trainers.data.io import DataError
    from trainers.data.task import build_task

    try:
        task = build_task(cfg.data, cache_dir=cfg.run.cache_dir, progress=not args.json)
    except DataError as err:
        print(f"dpalign data: {err}", file=sys.stderr)
        return 2
    summary = summarize(task)
    if args.json:
        print(json.dumps(summary))
        return 0
    c, u, s = task.counts, task.users, task.stats
    origin = "built" if task.built else ("reused from the cache" if task.root else "your files, validated")
    if cfg.data.source == "hf":
        origin = f"Hugging Face dataset {cfg.data.hf_dataset}, validated"
    print(f"data         {origin}")
    if "public_train" in c:
        print(f"public       {c['public_train']:,} train / {c['public_valid']:,} valid texts", end="")
        print(f", {s['public_distinct_words']:,} distinct words" if "public_distinct_words" in s else "")
    print(f"D1 sft       {c['sft']:,} records from {u['sft']:,} users")
    print(f"D2 rm        {c['rm']:,} preference pairs from {u['rm']:,} users")
    print(f"D3 ppo       {c['ppo']:,} prompts from {u['ppo']:,} users")
    print(f"eval         {c['eval']:,} public prompts")
    if "domain_valid" in c:
        print(f"validation   {c['domain_valid']:,} public texts of the users' domain (the stages validate on them)")
    mode = "sequential composition" if u["shared"] else "parallel composition"
    print(f"shared users {u['shared']:,} in more than one stage ({mode})")
    for name in task.per_record_users:
        print(f"note         {name}: no user_id column, each record is its own user")
    if "sft_mean_gold_reward" in s:
        print(
            f"gold reward  D1 responses mean {s['sft_mean_gold_reward']:+.3f} "
            f"({100 * s['sft_positive_fraction']:.0f}% positive); D2 labels agree with the oracle "
            f"{100 * s['rm_label_agrees_with_oracle']:.1f}%"
        )
    if task.canaries:
        print(
            f"canaries     {len(task.canaries)} planted in D1 (users {', '.join(c.user_id for c in task.canaries[:5])}"
            + (", ..." if len(task.canaries) > 5 else "")
            + ")"
        )
    print(f"cache        {task.root or '(source=files: nothing cached)'}")
    return 0

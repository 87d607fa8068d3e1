"""`dpalign pretrain`: build the task's public corpus, then train (or reuse) the tokenizer and base model.

Prints the model size, pretraining steps and seconds, held-out perplexity against the unigram baseline, and the
cache directory that later stages load with ``from_pretrained``. With ``model.name_or_path`` set nothing is
trained: the named model is the base model.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from launch.commands._common import add_config_args, load_run_config


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="train (or reuse from the cache) the tokenizer and base model on the public corpus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    parser.set_defaults(func=main)


def summarize(info: Any) -> dict[str, Any]:
    """The printed summary of a :class:`trainers.models.base.BaseModelInfo` (plain data, JSON-ready)."""
    summary: dict[str, Any] = {"model_dir": info.path, "built": info.built}
    m = info.metrics
    if m is None:
        summary["note"] = "model.name_or_path is set: loaded with from_pretrained, not pretrained here"
        return summary
    summary.update(
        params=m.params,
        steps=m.steps,
        seconds=m.seconds,
        cpu_seconds=m.cpu_seconds,
        build_seconds=m.build_seconds,
        threads=m.threads,
        ppl=round(m.ppl, 3),
        unigram_ppl=round(m.unigram_ppl, 3),
        ppl_ratio=round(m.ppl / m.unigram_ppl, 4),
        train_tokens=m.train_tokens,
        eval_tokens=m.eval_tokens,
    )
    return summary


def main(args: argparse.Namespace) -> int:
    cfg = load_run_config(args)

    from trainers.data.task import build_task
    from trainers.models.base import ensure_base_model

    try:
        task = build_task(cfg.data, cache_dir=cfg.run.cache_dir, progress=True)
        info = ensure_base_model(
            cfg.model,
            cfg.data,
            cache_dir=cfg.run.cache_dir,
            public_train=task.public_train,
            public_valid=task.public_valid,
            progress=True,
        )
    except (FileNotFoundError, ValueError) as err:  # bad data: the message names the file, row and fix
        print(f"dpalign pretrain: {err}", file=sys.stderr)
        return 2
    summary = summarize(info)
    if args.json:
        print(json.dumps(summary))
        return 0
    if info.metrics is None:
        print(f"base model: {info.path} ({summary['note']})")
        return 0
    origin = "built" if info.built else "reused from the cache"
    print(f"base model   {summary['params']:,} parameters, {origin}")
    print(
        f"pretraining  {summary['steps']} steps in {summary['seconds']:.1f} s wall, "
        f"{summary['cpu_seconds']:.1f} s CPU, torch threads {summary['threads']}"
    )
    print(
        f"held-out     perplexity {summary['ppl']:.2f} vs unigram {summary['unigram_ppl']:.2f} "
        f"(ratio {summary['ppl_ratio']:.3f}, {summary['eval_tokens']:,} tokens)"
    )
    print(f"cache        {info.path}")
    return 0

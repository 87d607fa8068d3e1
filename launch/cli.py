"""The `dpalign` command line: one subcommand per module in `launch/commands/`.

Subcommand modules are imported when the parser is built, so they keep heavy imports (torch, Ray, DeepSpeed)
inside their ``main`` functions; `dpalign --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dpalign import __version__
from dpalign.allocator import keep_freed_memory

# Order is the order shown by `dpalign --help`. A command whose module is not in this checkout is not listed.
COMMANDS: tuple[str, ...] = ("run", "data", "pretrain", "privacy", "audit", "tune", "controller", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpalign",
        description="Differentially private RLHF on Ray: DP-SFT -> DP reward model -> DP-PPO, "
        "with per-user (epsilon, delta) accounting and a learned clip/noise controller.",
    )
    parser.add_argument("--version", action="version", version=f"dpalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"launch.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"launch.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Output cut short by the reader (``dpalign run --help-config | head``) ends quietly with
    the shell's SIGPIPE status instead of a BrokenPipeError traceback."""
    try:
        try:
            return _dispatch(argv)
        finally:
            sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
    except BrokenPipeError:
        # Python's documented recipe: point stdout at devnull so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13  # what a shell reports for a process killed by SIGPIPE


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    keep_freed_memory()  # training steps on CPU otherwise fault their activations in page by page, every step
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

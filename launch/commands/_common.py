"""Shared CLI plumbing: --config / overrides / --help-config, and clean one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from launch.config import ConfigError, format_help, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """`--config FILE`, positional `key=value` overrides, and `--help-config` (every field, documented)."""
    parser.add_argument("--config", default=None, help="YAML config (see launch/configs/); defaults if omitted")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. sft.epochs=2 data.num_users=300"
    )
    parser.add_argument(
        "--help-config", action="store_true", help="list every config field with its type, default and meaning"
    )


def load_run_config(args: argparse.Namespace, cls: Any = None) -> Any:
    """Load the root config (or ``cls``) from args; print help and exit on --help-config; exit 2 on errors."""
    if cls is None:
        from launch.schema import RunConfig

        cls = RunConfig
    if getattr(args, "help_config", False):
        print(format_help(cls))
        raise SystemExit(0)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"dpalign: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

"""Shared CLI plumbing: --config / overrides / --help-config, and clean one-line errors."""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any

from launch.config import ConfigError, format_help, load_config


def add_config_args(parser: argparse.ArgumentParser, config_what: str = "the run config") -> None:
    """`--config FILE`, positional `key=value` overrides, and `--help-config` (every field, documented).

    ``--help`` stays short (the options of the command) and points to ``--help-config`` for the config's fields
    (hundreds of lines); ``config_what`` names the config ``--help-config`` lists for this command.
    """
    command = parser.prog
    note = (f"Config fields ({config_what}: YAML sections, or dotted KEY=VALUE overrides): "
            f"`{command} --help-config` lists every field with its type, default and meaning.")
    note = textwrap.fill(note, width=100, break_on_hyphens=False)
    parser.epilog = f"{parser.epilog}\n\n{note}" if parser.epilog else note
    parser.add_argument("--config", default=None, help="YAML config (see launch/configs/); defaults if omitted")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. sft.epochs=2 data.num_users=300"
    )
    parser.add_argument(
        "--help-config", action="store_true", help=f"list every field of {config_what} with its type, default and meaning"
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
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"dpalign: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if hasattr(cfg, "run") and hasattr(cfg, "ray"):  # a run config: workers must not see relative paths
        from launch.paths import resolve_config_paths

        resolve_config_paths(cfg)
    return cfg

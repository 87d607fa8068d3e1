"""Shared CLI plumbing: --config / overrides / --help-config, and clean one-line errors."""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from typing import Any

from launch.config import ConfigError, format_help, load_config


def add_config_args(parser: argparse.ArgumentParser, config_class: str = "launch.schema:RunConfig") -> None:
    """`--config FILE`, positional `key=value` overrides, and `--help-config` (every field, documented).

    ``--help`` also lists every config field (from the field docstrings, imported only when help is asked for).
    """
    base_format = parser.format_help

    def format_with_fields() -> str:
        module, name = config_class.split(":")
        cls = getattr(importlib.import_module(module), name)
        fields = textwrap.indent(format_help(cls), "  ")
        return f"{base_format()}\nconfig fields (YAML sections, or dotted KEY=VALUE overrides):\n{fields}\n"

    parser.format_help = format_with_fields  # type: ignore[method-assign]
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
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"dpalign: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if hasattr(cfg, "run") and hasattr(cfg, "ray"):  # a run config: workers must not see relative paths
        from launch.paths import resolve_config_paths

        resolve_config_paths(cfg)
    return cfg

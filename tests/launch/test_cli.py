"""The dpalign entry point: lists its subcommands and explains config fields."""

from __future__ import annotations

import subprocess
import sys

from launch.cli import COMMANDS, build_parser, main


def test_help_lists_present_subcommands(capsys):
    parser = build_parser()
    text = parser.format_help()
    present = [name for name in COMMANDS if f"{name}" in text]
    assert "data" in present and "pretrain" in present


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: dpalign" in capsys.readouterr().out


def test_console_entry_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "launch.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "COMMAND" in out.stdout


def test_subcommand_help_explains_every_config_field(capsys):
    import pytest

    from launch.config import describe_fields
    from launch.schema import RunConfig

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for name, _, _, _ in describe_fields(RunConfig):
        assert name in out, name
    assert "Bradley-Terry temperature" in out  # a docstring, not only the name

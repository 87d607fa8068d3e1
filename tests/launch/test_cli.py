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


def test_help_config_explains_every_config_field(capsys):
    import pytest

    from launch.config import describe_fields
    from launch.schema import RunConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help-config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name, _, _, _ in describe_fields(RunConfig):
        assert name in out, name
    assert "Bradley-Terry temperature" in out  # a docstring, not only the name


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, timeout=120)


def test_version():
    import dpalign

    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"dpalign {dpalign.__version__}"


def test_run_help_is_short_and_points_to_help_config():
    out = _cli("run", "--help")
    assert out.returncode == 0
    assert len(out.stdout.splitlines()) <= 40, len(out.stdout.splitlines())  # was 504 lines with every field
    assert "--help-config" in out.stdout and "dpalign run --help-config" in " ".join(out.stdout.split())
    assert "Bradley-Terry temperature" not in out.stdout


def test_audit_help_shows_the_audits_own_options():
    out = _cli("audit", "--help")
    assert out.returncode == 0
    for option in ("--kind", "--stage", "--canaries", "--confidence", "--candidates", "--max-users", "--run"):
        assert option in out.stdout, option
    assert "Bradley-Terry temperature" not in out.stdout  # not the run config's fields
    # its --help-config lists the white-box audit's own config, not the run config
    cfg = _cli("audit", "--help-config")
    from launch.config import describe_fields
    from trainers.audit.whitebox import WhiteboxAuditConfig

    assert cfg.returncode == 0
    assert all(name in cfg.stdout for name, _, _, _ in describe_fields(WhiteboxAuditConfig))
    assert "Bradley-Terry temperature" not in cfg.stdout


def test_privacy_epsilon_and_sigma_have_a_description_and_a_runnable_example():
    import shlex

    for action in ("epsilon", "sigma"):
        out = _cli("privacy", action, "--help")
        assert out.returncode == 0
        assert "dp-accounting" in out.stdout, action  # the description
        example = [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("dpalign privacy")]
        assert len(example) == 1, action
        ran = _cli(*shlex.split(example[0])[1:])  # the example as printed runs and prints an epsilon
        assert ran.returncode == 0 and "epsilon = " in ran.stdout, (action, ran.stderr[-500:])
        if action == "epsilon":
            assert "epsilon = 2.38" in ran.stdout and "-> epsilon = 2.38" in out.stdout


def test_help_config_into_a_closed_pipe_ends_without_a_traceback():
    """`dpalign run --help-config | head`: the reader goes away before the writer is done."""
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "run", "--help-config"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes a byte: every write hits EPIPE
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141
    shell = subprocess.run(f"{shlex_quote(sys.executable)} -m launch.cli run --help-config | head -3",
                           shell=True, capture_output=True, text=True, timeout=120)
    assert shell.returncode == 0 and len(shell.stdout.splitlines()) == 3 and "Traceback" not in shell.stderr


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)

"""The typed config loader: YAML + dotted overrides, validated once with errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from launch.config import ConfigError, config_hash, dump_yaml, field_docs, format_help, load_config, require
from launch.schema import RunConfig

REPO = Path(__file__).resolve().parents[2]


@dataclass
class _Inner:
    rate: float = 0.5
    """A rate in (0, 1]."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""

    def check(self) -> None:
        require(0 < self.rate <= 1, "rate", "must be in (0, 1]")


@dataclass
class _Outer:
    steps: int = 3
    """How many steps."""
    name: str | None = None
    """Optional name."""
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    """Sizes."""
    inner: _Inner = field(default_factory=_Inner)
    """Nested section."""


def test_defaults_and_overrides_convert_types():
    cfg = load_config(_Outer, None, ["steps=7", "inner.rate=1", "inner.mode=b", "sizes=[3, 4]", "name=x"])
    assert cfg.steps == 7 and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.mode == "b" and cfg.sizes == [3, 4] and cfg.name == "x"
    assert load_config(_Outer, None, ["inner.rate=1e-5"]).inner.rate == 1e-5  # YAML 1.1 reads this as a string


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("stepz=1", "stepz: unknown key in _Outer; allowed keys: inner, name, sizes, steps"),
        ("steps=abc", "steps: got 'abc'; expected an integer"),
        ("steps=1.5", "steps: got 1.5; expected an integer"),
        ("inner.rate=0", "inner.rate: must be in (0, 1]"),
        ("inner.mode=c", "inner.mode: got 'c'; allowed: 'a', 'b'"),
        ("sizes=[1, x]", "sizes[1]: got 'x'; expected an integer"),
        ("inner=3", "inner: got 3; expected a mapping of _Inner fields"),
        ("steps", "an override must look like section.field=value"),
    ],
)
def test_errors_name_the_field_and_what_is_allowed(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(_Outer, None, [override])
    assert fragment in str(err.value)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(_Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_Outer, bad)
    good = tmp_path / "good.yaml"
    good.write_text("steps: 11\ninner:\n  rate: 0.25\n")
    cfg = load_config(_Outer, good, ["steps=12"])
    assert cfg.steps == 12 and cfg.inner.rate == 0.25  # the override wins over the file


def test_help_comes_from_field_docstrings():
    assert field_docs(_Inner) == {"rate": "A rate in (0, 1].", "mode": "Which mode."}
    text = format_help(_Outer)
    assert "inner.rate" in text and "A rate in (0, 1]." in text and "default 0.5" in text


def test_every_root_field_is_documented():
    text = format_help(RunConfig)
    from launch.config import describe_fields

    undocumented = [name for name, _, _, doc in describe_fields(RunConfig) if not doc]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    assert "data.num_users" in text


@pytest.mark.parametrize("path", sorted((REPO / "launch" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if path.name.startswith("tune-"):  # a study config (dpalign tune), checked against its base run config
        from launch.study import StudyConfig, check_study

        study = load_config(StudyConfig, path)
        check_study(study)
        # every shipped study also runs as repeat_and_select (its trials share one RDP filter budget)
        check_study(load_config(StudyConfig, path, ["study.mode=repeat_and_select"]))
        return
    cfg = load_config(RunConfig, path)
    assert isinstance(cfg, RunConfig)


def test_resolved_config_round_trips_and_hash_tracks_content(tmp_path):
    cfg = load_config(RunConfig, None, ["data.num_users=77"])
    out = dump_yaml(cfg, tmp_path / "config.yaml")
    again = load_config(RunConfig, out)
    assert again == cfg
    assert config_hash(cfg.data) == config_hash(again.data)
    assert config_hash(cfg.data) != config_hash(load_config(RunConfig, None, ["data.num_users=78"]).data)

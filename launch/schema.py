"""The root run config: one section per component, each a small dataclass owned by that component.

Sections are added here as components land; a YAML file names sections and fields, and `dpalign <cmd> --help-config`
prints every field with its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launch.config import require
from trainers.data.config import DataConfig
from trainers.models.config import BaseModelConfig


@dataclass
class RunSection:
    """Where a run writes, and its global seed."""

    name: str = "demo"
    """Run name; the run directory is <out_dir>/<name>-<timestamp> unless run.dir is set."""
    out_dir: str = "runs"
    """Parent directory of run directories."""
    dir: str = ""
    """Exact run directory to use (empty: derived from out_dir, name and the start time)."""
    cache_dir: str = ".cache/dpalign"
    """Cache of built artifacts (data, tokenizer, base model), keyed by the hash of the config that made them."""
    seed: int = 0
    """Global seed for everything that is not seeded by its own section."""

    def check(self) -> None:
        require(bool(self.name.strip()), "run.name", "must be a non-empty string")
        require(self.seed >= 0, "run.seed", "must be >= 0")


@dataclass
class RunConfig:
    """Everything one `dpalign run` needs."""

    run: RunSection = field(default_factory=RunSection)
    """Run directory, caches and seed."""
    data: DataConfig = field(default_factory=DataConfig)
    """The embedded task (or your own files): public corpus, private users, stage splits."""
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    """The base language model and its tokenizer (built and pretrained locally, or loaded by name)."""

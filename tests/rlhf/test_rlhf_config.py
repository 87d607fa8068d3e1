"""PPOObjectiveConfig: loads from YAML with overrides, refuses batch whitening at load time, builds controllers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launch.config import ConfigError, field_docs, load_config
from trainers.rlhf.config import PPOObjectiveConfig
from trainers.rlhf.ppo import AdaptiveKLController, FixedKLController


@dataclass
class Root:
    """A root config holding the PPO objective under ``ppo`` (as the run's root config will)."""

    ppo: PPOObjectiveConfig = field(default_factory=PPOObjectiveConfig)
    """The PPO objective."""


def test_defaults_are_trl_and_every_field_is_documented() -> None:
    cfg = load_config(PPOObjectiveConfig)
    assert (cfg.gamma, cfg.lam, cfg.clip_eps, cfg.value_clip, cfg.vf_coef) == (1.0, 0.95, 0.2, 0.2, 0.1)
    assert isinstance(cfg.build_kl_controller(), FixedKLController)
    docs = field_docs(PPOObjectiveConfig)
    assert set(docs) == {f for f in PPOObjectiveConfig.__dataclass_fields__}


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  lam: 0.9\n  kl_controller: adaptive\n  advantage_normalization: per_trajectory\n")
    cfg = load_config(Root, path, ["ppo.value_clip=0", "ppo.kl_target=3"])
    assert cfg.ppo.lam == 0.9 and cfg.ppo.value_clip_or_none is None
    ctl = cfg.ppo.build_kl_controller()
    assert isinstance(ctl, AdaptiveKLController) and ctl.target == 3.0


def test_batch_whitening_refused_at_load_time() -> None:
    with pytest.raises(ConfigError, match=r"ppo\.advantage_normalization='batch' is refused.*sensitivity"):
        load_config(Root, None, ["ppo.advantage_normalization=batch"])
    with pytest.raises(ConfigError, match=r"ppo\.advantage_normalization='zscore' is unknown"):
        load_config(Root, None, ["ppo.advantage_normalization=zscore"])


@pytest.mark.parametrize(
    ("override", "field_name"),
    [("ppo.gamma=1.5", "ppo.gamma"), ("ppo.clip_eps=0", "ppo.clip_eps"), ("ppo.advantage_scale=0", "ppo.advantage_scale")],
)
def test_out_of_range_values_name_the_field(override: str, field_name: str) -> None:
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        load_config(Root, None, [override])


def test_rloo_needs_several_samples_and_no_per_trajectory_whitening() -> None:
    from launch.schema import RunConfig

    cfg = load_config(RunConfig, None, ["ppo.objective.advantage_estimator=rloo", "ppo.samples_per_prompt=2"])
    assert not cfg.ppo.objective.critic and load_config(RunConfig).ppo.objective.critic
    with pytest.raises(ConfigError, match=r"ppo\.samples_per_prompt: must be >= 2 with objective\.advantage_estimator"):
        load_config(RunConfig, None, ["ppo.objective.advantage_estimator=rloo"])
    with pytest.raises(ConfigError, match=r"advantage_normalization: per_trajectory whitens"):
        load_config(RunConfig, None, ["ppo.objective.advantage_estimator=rloo", "ppo.samples_per_prompt=2",
                                      "ppo.objective.advantage_normalization=per_trajectory"])
    with pytest.raises(ConfigError, match=r"advantage_estimator"):
        load_config(RunConfig, None, ["ppo.objective.advantage_estimator=grpo", "ppo.samples_per_prompt=2"])

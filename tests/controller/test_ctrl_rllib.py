"""RLlib path: the exported actor equals RLlib SAC's deterministic action; a tiny pretraining writes an artifact."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from controller.artifact import ObsNorm, Provenance, load_artifact, save_artifact
from controller.config import ControllerConfig, ProxyEnvConfig
from controller.spaces import SpaceSpec


def _rllib_sac_module(spec: SpaceSpec, hidden: list[int]):
    from ray.rllib.algorithms.sac.torch.default_sac_torch_rl_module import DefaultSACTorchRLModule
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from controller.sb3 import normalized_space

    model_config = dataclasses.asdict(
        DefaultModelConfig(fcnet_hiddens=hidden, fcnet_activation="relu", head_fcnet_hiddens=[])
    )
    return RLModuleSpec(
        module_class=DefaultSACTorchRLModule,
        observation_space=normalized_space(spec),
        action_space=spec.action_space(),
        model_config={**model_config, "twin_q": True},
    ).build()


def test_rllib_actor_export_round_trip(tmp_path):
    from ray.rllib.core.columns import Columns

    from controller.rllib import actor_from_rllib

    spec = SpaceSpec(buckets=3)
    module = _rllib_sac_module(spec, [16, 16])
    norm = ObsNorm([0.5] * spec.obs_dim, [4.0] * spec.obs_dim, 10.0)
    save_artifact(
        tmp_path,
        spec=spec,
        actor=actor_from_rllib(module, spec),
        obs_norm=norm,
        provenance=Provenance(trainer="rllib"),
    )
    art = load_artifact(tmp_path)
    raw = np.random.default_rng(0).normal(size=(6, spec.obs_dim)).astype(np.float32)
    with torch.no_grad():
        dist = module.forward_inference({Columns.OBS: torch.as_tensor(np.stack([norm(o) for o in raw]))})
    expected = torch.tanh(dist[Columns.ACTION_DIST_INPUTS][:, : spec.act_dim]).numpy()  # deterministic action
    got = np.stack([art.act(o) for o in raw])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert art.provenance.trainer == "rllib" and art.sb3_dir is None


def test_artifact_refuses_foreign_versions(tmp_path):
    import json

    spec = SpaceSpec()
    from controller.artifact import MLPActor

    save_artifact(
        tmp_path,
        spec=spec,
        actor=MLPActor(spec.obs_dim, spec.act_dim, [8]),
        obs_norm=ObsNorm.identity(spec.obs_dim),
        provenance=Provenance(trainer="sb3"),
    )
    meta = json.loads((tmp_path / "artifact.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version"):
        load_artifact(tmp_path)
    with pytest.raises(FileNotFoundError, match="controller pretrain"):
        load_artifact(tmp_path / "missing")


@pytest.mark.slow
def test_rllib_pretraining_writes_a_loadable_artifact(tmp_path):
    """Real RLlib SAC, 2 iterations, 1 env runner on an embedded Ray (~40 s on 2 cores)."""
    from cluster.runtime import ray_session
    from controller.rllib import pretrain_rllib

    cfg = ControllerConfig(
        hidden=[16, 16],
        batch_size=8,
        learning_starts=2,
        env=ProxyEnvConfig(steps=10, interval=5, base_pretrain_steps=5, train_texts=64, valid_texts=8),
    )
    with ray_session(num_cpus=2):
        path, curve = pretrain_rllib(
            cfg, out=tmp_path / "art", iterations=2, num_env_runners=1, norm_episodes=1
        )
    art = load_artifact(path)
    assert art.provenance.trainer == "rllib" and len(curve) == 2 and art.provenance.env_steps > 0
    assert art.spec == cfg.spec()
    action = art.act(np.zeros(art.spec.obs_dim, dtype=np.float32))
    assert action.shape == (art.spec.act_dim,) and np.all(np.abs(action) <= 1.0)

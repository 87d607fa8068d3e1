"""Pretraining at scale: RLlib SAC (new API stack) over parallel proxy DP fine-tuning envs on PUBLIC data.

Each env runner (a Ray actor; ``num_env_runners`` of them, on the embedded Ray or a cluster) builds its own
:class:`controller.env.ProxyDPEnv`; runner i fine-tunes a model of depth ``layers[i % len(layers)]`` so one
pretraining sees several depths of the family (the spaces do not depend on depth). Observations are normalized
with stats fitted once in the driver on rollouts of the default schedule, and those stats go into the artifact.

Export: RLlib's SAC actor is ``pi_encoder`` (ReLU MLP) + ``pi`` head (Linear to 2 * act_dim: mean and log-std);
the deterministic action is tanh(mean) in [-1, 1] (the action space). :func:`actor_from_rllib` copies those
weights into the same plain :class:`MLPActor` the SB3 path writes, so one artifact format serves both.

Warm-up differs from SB3's: RLlib samples from its initial stochastic policy for
``num_steps_sampled_before_learning_starts`` steps (not the default action); pretraining spends no privacy, so
exploratory warm-up is harmless here.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controller.artifact import MLPActor, ObsNorm, Provenance, save_artifact
from controller.config import ControllerConfig
from controller.spaces import SpaceSpec

ENV_NAME = "dpalign_controller_proxy"


def make_env(env_config: Any) -> Any:
    """RLlib env creator: a normalized ProxyDPEnv; the runner index picks the model depth."""
    from controller.env import ProxyDPEnv
    from controller.sb3 import NormalizedObs

    env_cfg = dict(env_config["env"])
    layers = list(env_config.get("layers") or [env_cfg["n_layer"]])
    index = int(getattr(env_config, "worker_index", 0))
    env_cfg["n_layer"] = int(layers[index % len(layers)])
    env_cfg["seed"] = int(env_cfg["seed"]) + 1000 * index + int(getattr(env_config, "vector_index", 0))
    env = ProxyDPEnv(env_cfg, env_config["spec"])
    return NormalizedObs(env, ObsNorm(**env_config["obs_norm"]))


def actor_from_rllib(module: Any, spec: SpaceSpec) -> MLPActor:
    """Copy the deterministic part of RLlib's SAC actor (encoder MLP + first half of the head) into MLPActor."""
    enc = [m for m in module.pi_encoder.modules() if isinstance(m, torch.nn.Linear)]
    head = [m for m in module.pi.modules() if isinstance(m, torch.nn.Linear)]
    if len(head) != 1:
        raise ValueError(f"expected a single-Linear pi head (head_fcnet_hiddens=[]), got {len(head)} layers")
    last = head[0]
    if last.out_features != 2 * spec.act_dim:
        raise ValueError(f"pi head outputs {last.out_features}, expected 2 * {spec.act_dim} (mean, log_std)")
    actor = MLPActor(spec.obs_dim, spec.act_dim, [lin.out_features for lin in enc])
    with torch.no_grad():
        for dst, src in zip(actor.linears()[:-1], enc, strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        actor.mu.weight.copy_(last.weight[: spec.act_dim])  # rows [0, A): the mean
        actor.mu.bias.copy_(last.bias[: spec.act_dim])
    return actor.eval()


def build_sac(config: ControllerConfig, *, obs_norm: ObsNorm, layers: list[int], num_env_runners: int) -> Any:
    from ray.rllib.algorithms.sac import SACConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_env)
    spec = config.spec()
    env_config = {
        "env": asdict(config.env),
        "spec": spec.to_dict(),
        "obs_norm": asdict(obs_norm),
        "layers": list(layers),
    }
    decisions = -(-config.env.steps // config.env.interval)
    sac = (
        SACConfig()
        .environment(ENV_NAME, env_config=env_config)
        .env_runners(
            num_env_runners=num_env_runners,
            num_envs_per_env_runner=1,
            rollout_fragment_length=decisions,
            num_cpus_per_env_runner=1,
        )
        .training(
            actor_lr=config.learning_rate,
            critic_lr=config.learning_rate,
            alpha_lr=config.learning_rate,
            train_batch_size_per_learner=config.batch_size,
            num_steps_sampled_before_learning_starts=max(config.learning_starts, 1),
            replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer", "capacity": config.buffer_size},
        )
        .rl_module(
            model_config=DefaultModelConfig(
                fcnet_hiddens=list(config.hidden), fcnet_activation="relu", head_fcnet_hiddens=[]
            )
        )
        .reporting(min_sample_timesteps_per_iteration=decisions, metrics_num_episodes_for_smoothing=5)
        .debugging(seed=config.seed)
    )
    return sac.build_algo()


def pretrain_rllib(
    config: ControllerConfig,
    *,
    out: str | Path,
    iterations: int | None = None,
    num_env_runners: int | None = None,
    layers: list[int] | None = None,
    norm_episodes: int = 2,
) -> tuple[Path, list[float]]:
    """Train the controller with RLlib SAC on proxy envs and write the artifact to ``out``.

    Ray must be initialized by the caller (``cluster.runtime.init_ray``: embedded or a cluster).

    Returns:
        (artifact path, mean episode return per iteration; NaN before the first finished episode).
    """
    from controller.env import ProxyDPEnv
    from controller.sb3 import fit_obs_norm

    config.check()
    iterations = config.pretrain_iterations if iterations is None else iterations
    runners = config.pretrain_env_runners if num_env_runners is None else num_env_runners
    layers = layers or [config.env.n_layer]
    spec = config.spec()
    norm_cfg = copy.deepcopy(config.env)
    norm = fit_obs_norm(ProxyDPEnv(norm_cfg, spec), episodes=norm_episodes, seed=config.seed)
    algo = build_sac(config, obs_norm=norm, layers=layers, num_env_runners=runners)
    curve: list[float] = []
    env_steps = 0
    try:
        for _ in range(iterations):
            result = algo.train()
            runners_res = result.get("env_runners", {})
            curve.append(float(runners_res.get("episode_return_mean", np.nan)))
            env_steps = int(runners_res.get("num_env_steps_sampled_lifetime", env_steps))
        actor = actor_from_rllib(algo.get_module(), spec)
    finally:
        algo.stop()
    provenance = Provenance(
        trainer="rllib",
        model_layers=list(layers),
        model_width=config.env.n_embd,
        epsilons=list(config.env.target_epsilons),
        delta=config.env.delta,
        steps=config.env.steps,
        env_steps=env_steps,
        training_curve=curve,
        reward=config.env.reward,
    )
    path = save_artifact(out, spec=spec, actor=actor, obs_norm=norm, provenance=provenance)
    return path, curve

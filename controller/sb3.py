"""Online SAC with stable-baselines3: learning inside a run (RLDP's setting) and in-process proxy training.

Inside a run the engine drives time, not a gym loop, so :class:`OnlineSAC` uses SB3's pieces directly: the
policy to act, the replay buffer to store (obs, action, reward, next_obs, done) per controller interval, and
``SAC.train`` for gradient steps. Warm-up: the first ``learning_starts`` decisions take the DEFAULT action (the
fixed DP-SGD schedule: reference thresholds, sigma at the floor) instead of SB3's uniform-random warm-up, so a
run never starts by exploring wildly with private data; :class:`WarmStartSAC` does the same inside ``learn()``.

State: ``save(dir)`` writes the SB3 model (actor, critics, targets, optimizers, entropy coefficient), the replay
buffer and the counters/normalization, so a run resumed from its checkpoint continues the same learner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.logger import Logger

from controller.artifact import NORM_CLIP, ControllerArtifact, MLPActor, ObsNorm, Provenance, save_artifact
from controller.config import ControllerConfig
from controller.spaces import SpaceSpec


class WarmStartSAC(SAC):
    """SAC whose warm-up (``learning_starts``) takes a fixed default action instead of uniform-random ones."""

    default_action: np.ndarray | None = None

    def _sample_action(self, learning_starts: int, action_noise: Any = None, n_envs: int = 1):
        if self.num_timesteps < learning_starts and self.default_action is not None:
            a = np.tile(self.default_action.astype(np.float32), (n_envs, 1))  # [n_envs, act_dim], in [-1, 1]
            return a, a  # the action space is [-1, 1]: scaled and unscaled actions coincide
        return super()._sample_action(learning_starts, action_noise, n_envs)


def normalized_space(spec: SpaceSpec) -> gym.spaces.Box:
    """SB3 always sees normalized observations, clipped to +-NORM_CLIP."""
    return gym.spaces.Box(-NORM_CLIP, NORM_CLIP, shape=(spec.obs_dim,), dtype=np.float32)


class SpacesOnly(gym.Env):
    """The controller's spaces for SB3's constructor when the run, not a gym loop, produces transitions."""

    def __init__(self, spec: SpaceSpec) -> None:
        self.observation_space = normalized_space(spec)
        self.action_space = spec.action_space()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        raise RuntimeError(
            "the online controller is driven by the DP run's plan/observe calls, not by env.reset"
        )

    def step(self, action):
        raise RuntimeError(
            "the online controller is driven by the DP run's plan/observe calls, not by env.step"
        )


class NormalizedObs(gym.ObservationWrapper):
    """Applies a fixed :class:`ObsNorm` (the artifact's) to an env's observations."""

    def __init__(self, env: gym.Env, norm: ObsNorm) -> None:
        super().__init__(env)
        self.norm = norm
        self.observation_space = normalized_space(env.unwrapped.space_spec)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return self.norm(observation)


def make_sac(spec: SpaceSpec, config: ControllerConfig, env: gym.Env | None = None) -> WarmStartSAC:
    model = WarmStartSAC(
        "MlpPolicy",
        env if env is not None else SpacesOnly(spec),
        learning_rate=config.learning_rate,
        buffer_size=config.buffer_size,
        learning_starts=config.learning_starts,
        batch_size=config.batch_size,
        gradient_steps=config.gradient_steps,
        ent_coef=config.ent_coef if config.ent_coef.startswith("auto") else float(config.ent_coef),
        train_freq=1,
        policy_kwargs={"net_arch": list(config.hidden)},
        seed=config.seed,
        device="cpu",
        verbose=0,
    )
    model.default_action = spec.default_action()
    # SB3's learn() otherwise configures its own logger, which makes an empty /tmp/SB3-<time> directory per call
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def actor_from_sb3(model: SAC, spec: SpaceSpec) -> MLPActor:
    """Copy SB3's deterministic actor (latent_pi MLP, mu, tanh) into a plain :class:`MLPActor`."""
    linears = [m for m in model.actor.latent_pi if isinstance(m, torch.nn.Linear)]
    actor = MLPActor(spec.obs_dim, spec.act_dim, [lin.out_features for lin in linears])
    with torch.no_grad():
        for dst, src in zip(actor.linears(), linears + [model.actor.mu], strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    return actor.eval()


def actor_into_sb3(actor: MLPActor, model: SAC) -> None:
    """Initialize SB3's actor from a plain actor (finetune from an RLlib artifact); critics start fresh."""
    linears = [m for m in model.actor.latent_pi if isinstance(m, torch.nn.Linear)] + [model.actor.mu]
    if [lin.weight.shape for lin in linears] != [lin.weight.shape for lin in actor.linears()]:
        raise ValueError(
            f"artifact actor hidden sizes {actor.hidden} differ from controller.hidden; set controller.hidden to "
            f"{actor.hidden} to finetune this artifact"
        )
    with torch.no_grad():
        for dst, src in zip(linears, actor.linears(), strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)


class OnlineSAC:
    """SB3 SAC driven by a run: ``act`` once per interval, ``add`` the finished interval, ``update``."""

    def __init__(
        self,
        model: WarmStartSAC,
        *,
        spec: SpaceSpec,
        config: ControllerConfig,
        obs_norm: ObsNorm,
        decisions: int = 0,
        curve: list[float] | None = None,
    ) -> None:
        self.model, self.spec, self.config, self.obs_norm = model, spec, config, obs_norm
        self.decisions = decisions
        self.curve = curve if curve is not None else []
        self.model.set_logger(Logger(folder=None, output_formats=[]))
        self.model._current_progress_remaining = 1.0

    @classmethod
    def create(
        cls, *, spec: SpaceSpec, config: ControllerConfig, artifact: ControllerArtifact | None = None
    ) -> OnlineSAC:
        """Fresh (online) or from an artifact (finetune: its full SB3 state when present, else its actor)."""
        if artifact is not None and artifact.sb3_dir is not None:
            return cls.load(artifact.sb3_dir, spec=spec, config=config)
        model = make_sac(spec, config)
        norm = ObsNorm.identity(spec.obs_dim)
        if artifact is not None:
            actor_into_sb3(artifact.actor, model)
            norm = artifact.obs_norm
        return cls(
            model,
            spec=spec,
            config=config,
            obs_norm=norm,
            decisions=config.learning_starts if artifact is not None else 0,
        )

    def act(self, obs: np.ndarray, *, deterministic: bool = False) -> np.ndarray:
        """Default action during warm-up, then SAC's: its mean moved ``controller.exploration`` of the way toward
        its stochastic sample (1: SAC as is), or the mean when ``deterministic``."""
        if self.decisions < self.config.learning_starts:
            action = self.spec.default_action()
        else:
            x = self.obs_norm(obs)
            scale = 0.0 if deterministic else float(self.config.exploration)
            if scale >= 1.0:
                action, _ = self.model.predict(x, deterministic=False)
            else:
                action, _ = self.model.predict(x, deterministic=True)
                if scale > 0.0:
                    sample, _ = self.model.predict(x, deterministic=False)
                    action = np.clip(action + scale * (sample - action), -1.0, 1.0)
        self.decisions += 1
        return np.asarray(action, dtype=np.float32)

    def add(
        self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, done: bool
    ) -> None:
        self.model.replay_buffer.add(
            self.obs_norm(obs)[None],
            self.obs_norm(next_obs)[None],
            np.asarray(action, np.float32)[None],
            np.array([reward], dtype=np.float32),
            np.array([done]),
            [{}],
        )
        self.model.num_timesteps += 1
        self.curve.append(float(reward))

    def update(self) -> None:
        if self.decisions < self.config.learning_starts or self.model.replay_buffer.size() == 0:
            return
        if self.config.gradient_steps > 0:
            self.model.train(gradient_steps=self.config.gradient_steps, batch_size=self.config.batch_size)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save(d / "model.zip")
        self.model.save_replay_buffer(d / "replay_buffer.pkl")
        (d / "state.json").write_text(
            json.dumps(
                {
                    "decisions": self.decisions,
                    "num_timesteps": int(self.model.num_timesteps),
                    "obs_norm": self.obs_norm.__dict__,
                    "curve": self.curve,
                }
            )
        )
        return d

    @classmethod
    def load(cls, directory: str | Path, *, spec: SpaceSpec, config: ControllerConfig) -> OnlineSAC:
        d = Path(directory)
        state = json.loads((d / "state.json").read_text())
        model = WarmStartSAC.load(d / "model.zip", env=SpacesOnly(spec), device="cpu")
        model.default_action = spec.default_action()
        if (d / "replay_buffer.pkl").is_file():
            model.load_replay_buffer(d / "replay_buffer.pkl")
        model.num_timesteps = int(state["num_timesteps"])
        return cls(
            model,
            spec=spec,
            config=config,
            obs_norm=ObsNorm(**state["obs_norm"]),
            decisions=int(state["decisions"]),
            curve=list(state["curve"]),
        )

    def export(self, path: str | Path, *, provenance: Provenance) -> Path:
        """Artifact with the plain actor, the normalization and the full SB3 state (for finetune)."""
        out = save_artifact(
            path,
            spec=self.spec,
            actor=actor_from_sb3(self.model, self.spec),
            obs_norm=self.obs_norm,
            provenance=provenance,
        )
        self.save(out / "sb3")
        return out


def fit_obs_norm(env: gym.Env, *, episodes: int, seed: int = 0) -> ObsNorm:
    """Normalization stats from rollouts of the default (fixed DP-SGD) action on a proxy env."""
    action = env.unwrapped.space_spec.default_action()
    obs_list = []
    for e in range(episodes):
        obs, _ = env.reset(seed=seed + e)
        obs_list.append(obs)
        done = False
        while not done:
            obs, _, term, trunc, _ = env.step(action)
            obs_list.append(obs)
            done = term or trunc
    return ObsNorm.fit(np.stack(obs_list))


def train_sb3(
    env: gym.Env,
    *,
    config: ControllerConfig,
    episodes: int,
    norm_episodes: int = 2,
    provenance: Provenance,
    out: str | Path | None = None,
) -> tuple[OnlineSAC, list[float]]:
    """SAC on a proxy env in-process (public data, no privacy cost); writes an artifact to ``out`` if given.

    Returns the learner and the return of every episode (the training curve).
    """
    from stable_baselines3.common.monitor import Monitor

    spec: SpaceSpec = env.unwrapped.space_spec
    norm = fit_obs_norm(env, episodes=norm_episodes, seed=config.seed)
    wrapped = Monitor(NormalizedObs(env, norm))
    model = make_sac(spec, config, env=wrapped)
    steps_per_episode = -(-env.unwrapped.cfg.steps // env.unwrapped.cfg.interval)
    model.learn(total_timesteps=episodes * steps_per_episode)
    curve = [float(r) for r in wrapped.get_episode_rewards()]
    learner = OnlineSAC(
        model, spec=spec, config=config, obs_norm=norm, decisions=int(model.num_timesteps), curve=curve
    )
    if out is not None:
        provenance.training_curve = curve
        provenance.env_steps = int(model.num_timesteps)
        learner.export(out, provenance=provenance)
    return learner, curve

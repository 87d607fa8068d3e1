"""The controller artifact: ONE directory format that SB3 and RLlib training both write and every user reads.

Layout of an artifact directory:
    artifact.json   format version, space spec, actor architecture, observation normalization, provenance
    actor.pt        the deterministic actor as a plain torch state_dict of :class:`MLPActor` (inference needs
                    neither stable-baselines3 nor RLlib)
    sb3/            optional: the full SB3 SAC state (model zip with critics and optimizers, replay buffer), written
                    by the online/SB3 path so ``controller.mode=finetune`` resumes learning exactly

Actor: obs -> normalize (mean/var, clipped to +-NORM_CLIP) -> Linear/ReLU MLP -> Linear(act_dim) -> tanh. This is
SB3 SAC's deterministic action (latent_pi, mu, tanh) and RLlib SAC's (pi encoder + head, first half of the
distribution inputs = mean, tanh squashing into [-1, 1]); both exporters copy their weights into it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from controller.spaces import SpaceSpec

FORMAT_VERSION = 1
ARTIFACT_FILE = "artifact.json"
ACTOR_FILE = "actor.pt"
SB3_DIR = "sb3"
NORM_CLIP = 10.0


class MLPActor(nn.Module):
    """Deterministic SAC actor: tanh(mu(ReLU MLP(obs))), actions in [-1, 1]^act_dim."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = obs_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.latent = nn.Sequential(*layers)
        self.mu = nn.Linear(prev, act_dim)
        self.obs_dim, self.act_dim, self.hidden = obs_dim, act_dim, list(hidden)

    def forward(self, obs: Tensor) -> Tensor:  # [n, obs_dim] -> [n, act_dim]
        return torch.tanh(self.mu(self.latent(obs)))

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.latent if isinstance(m, nn.Linear)] + [self.mu]


@dataclass
class ObsNorm:
    """Observation normalization (x - mean) / sqrt(var + 1e-8), clipped; identity by default."""

    mean: list[float]
    var: list[float]
    count: float = 0.0

    @classmethod
    def identity(cls, dim: int) -> ObsNorm:
        return cls([0.0] * dim, [1.0] * dim, 0.0)

    @classmethod
    def fit(cls, observations: np.ndarray) -> ObsNorm:
        """Stats of [n, obs_dim] observations (e.g. rollouts of the default schedule); constant features keep var 1."""
        obs = np.asarray(observations, dtype=np.float64)
        var = obs.var(axis=0)
        var = np.where(var < 1e-6, 1.0, var)
        return cls(obs.mean(axis=0).tolist(), var.tolist(), float(obs.shape[0]))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        x = (np.asarray(obs, dtype=np.float64) - np.asarray(self.mean)) / np.sqrt(np.asarray(self.var) + 1e-8)
        return np.clip(x, -NORM_CLIP, NORM_CLIP).astype(np.float32)


@dataclass
class Provenance:
    """Where a controller came from (for reuse decisions and the report)."""

    trainer: str
    """'sb3' (online / in-process) or 'rllib' (pretraining)."""
    model_family: str = "gpt2"
    model_layers: list[int] = field(default_factory=list)
    """Depths (n_layer) of the models it was trained on."""
    model_width: int = 0
    task: str = "proxy-public-reviews"
    epsilons: list[float] = field(default_factory=list)
    delta: float = 0.0
    steps: int = 0
    """DP steps per episode / stage it was trained with."""
    env_steps: int = 0
    """Controller decisions (transitions) it learned from."""
    training_curve: list[float] = field(default_factory=list)
    """Mean episode return per iteration/episode (a run's export: the reward of every decision)."""
    created: float = field(default_factory=time.time)
    stage: str = ""
    """A run's export: the private stage it controlled (sft, rm, ppo); empty for proxy pretraining."""
    source_run: str = ""
    """A run's export: the run directory it was exported from."""
    mode: str = ""
    """A run's export: the controller.mode it ran in (online, finetune, frozen)."""
    parent: str = ""
    """A run's export in finetune/frozen mode: the artifact it started from."""
    model_groups: list[str] = field(default_factory=list)
    """A run's export: the engine's clipping-group names of the model it controlled (public; at bucket
    granularity the spaces do not record them)."""
    reward: str = ""
    """The reward it learned from (controller.reward, or controller.env.reward for pretraining); empty in
    artifacts written before the field existed (they learned from validation_gain)."""


@dataclass
class ControllerArtifact:
    """A loaded artifact: the actor, its normalization, the spec and provenance."""

    spec: SpaceSpec
    actor: MLPActor
    obs_norm: ObsNorm
    provenance: Provenance
    path: Path | None = None

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic action [act_dim] for one raw observation [obs_dim]."""
        x = torch.as_tensor(self.obs_norm(obs)).reshape(1, -1)
        return self.actor(x)[0].numpy().astype(np.float32)

    @property
    def sb3_dir(self) -> Path | None:
        if self.path is None:
            return None
        d = self.path / SB3_DIR
        return d if (d / "model.zip").is_file() else None


def save_artifact(
    path: str | os.PathLike,
    *,
    spec: SpaceSpec,
    actor: MLPActor,
    obs_norm: ObsNorm,
    provenance: Provenance,
) -> Path:
    """Write an artifact directory (created if needed); returns its path."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if actor.obs_dim != spec.obs_dim or actor.act_dim != spec.act_dim:
        raise ValueError(
            f"actor is {actor.obs_dim}->{actor.act_dim} but the spec is {spec.obs_dim}->{spec.act_dim}"
        )
    if len(obs_norm.mean) != spec.obs_dim:
        raise ValueError(f"obs_norm has {len(obs_norm.mean)} dims, the spec {spec.obs_dim}")
    torch.save({k: v.detach().cpu() for k, v in actor.state_dict().items()}, out / ACTOR_FILE)
    meta = {
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "actor": {
            "obs_dim": actor.obs_dim,
            "act_dim": actor.act_dim,
            "hidden": actor.hidden,
            "activation": "relu",
            "squash": "tanh",
        },
        "obs_norm": asdict(obs_norm),
        "provenance": asdict(provenance),
    }
    tmp = out / (ARTIFACT_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / ARTIFACT_FILE)  # artifact.json last: its presence marks a complete artifact
    return out


def resolve_artifact_dir(path: str | os.PathLike, stage: str) -> Path:
    """The artifact directory ``controller.load=PATH`` means for ``stage``: PATH itself when it holds an artifact
    (one controller for every stage), else PATH/<stage> (a run's export, ``RUN_DIR/controller``, holds one per
    private stage).

    Raises:
        FileNotFoundError: neither exists.
    """
    p = Path(path)
    if (p / ARTIFACT_FILE).is_file():
        return p
    if (p / stage / ARTIFACT_FILE).is_file():
        return p / stage
    raise FileNotFoundError(
        f"controller.load={p}: neither {p / ARTIFACT_FILE} nor {p / stage / ARTIFACT_FILE} exists; point "
        f"controller.load at an artifact written by `dpalign controller pretrain` or at RUN_DIR/controller of a run "
        f"whose controller ran the {stage!r} stage"
    )


def load_artifact(path: str | os.PathLike) -> ControllerArtifact:
    """Read an artifact directory written by either trainer.

    Raises:
        FileNotFoundError: no artifact.json / actor.pt in ``path``.
        ValueError: unsupported format version or a spec/actor mismatch.
    """
    p = Path(path)
    meta_file = p / ARTIFACT_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{p}: no {ARTIFACT_FILE}; point controller.load at a directory written by `dpalign controller "
            "pretrain` or by an online run"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_file}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    spec = SpaceSpec.from_dict(meta["spec"])
    a = meta["actor"]
    if (a["obs_dim"], a["act_dim"]) != (spec.obs_dim, spec.act_dim):
        raise ValueError(f"{meta_file}: actor dims {a['obs_dim']}->{a['act_dim']} do not match the spec")
    actor = MLPActor(a["obs_dim"], a["act_dim"], a["hidden"])
    actor.load_state_dict(torch.load(p / ACTOR_FILE, map_location="cpu", weights_only=True))
    actor.eval()
    norm = ObsNorm(**meta["obs_norm"])
    known = {f for f in Provenance.__dataclass_fields__}
    prov = Provenance(**{k: v for k, v in meta["provenance"].items() if k in known})
    return ControllerArtifact(spec=spec, actor=actor, obs_norm=norm, provenance=prov, path=p)

"""What a stage recipe is given and what it may say: the stage context, the users (the privacy unit), and the
rules for what a private stage publishes (noise disclosure, wall time, progress bars, public losses).

Everything the loop logs is public or released: epsilon spent and sigma_eff (ledger), the norm of the released
noisy gradient (post-processing), and losses on PUBLIC held-out data. The training loss of a private stage is a
statistic of private data and never reaches a log or a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from accounting.composition import user_set_fingerprint
from trainers.engine.sampling import describe_noise


@dataclass
class StageContext:
    """What a stage recipe needs from the pipeline (built by ``launch.pipeline.pipeline``).

    Attributes:
        stage: "sft", "rm" or "ppo".
        cfg: the root RunConfig.
        private: whether this stage runs the DP engine under the preset.
        ledger: the run's write-ahead ledger (required when private).
        metrics: the run's MetricsLogger (or None in unit tests).
        plan: the stage's frozen privacy plan (``trainers.stages.plan.StagePlan``: q, T, K, target, delta, sigma),
            made by ``prepare_run`` before any step; the recipe checks it against its data and never calibrates.
            None: a recipe called directly plans this one stage from ``target_epsilon``/``target_delta``.
        target_epsilon, target_delta: this stage's budget (None when not private; the plan's when it has one).
        seed: seed of this stage's sampling, noise and initialization.
        progress: show progress bars.
        policy_factory: builds the clip/noise policy instead of the ``engine`` config (the learned controller).
        eval_prompts: PUBLIC held-out prompts (PPO's public evaluation and reward normalization); None: none.
        ray_storage: Ray Train's storage for this run's learners when ``ray.storage_path`` is unset (the pipeline
            passes RUN_DIR/ray_train); None: next to the stage's output directory.
        distributed: run the learner on ``ray.num_workers`` Ray Train workers (set by the pipeline when
            ``ray.num_workers >= 1``; Ray must be up). The ledger is handed to a sink actor for the stage and
            reopened into ``ctx.ledger`` afterwards, so callers must read ``ctx.ledger`` back after the stage.
        checkpoint_dir: where the in-process learner keeps this stage's latest mid-stage checkpoint (the pipeline
            passes RUN_DIR/checkpoints/<stage>, removed once the stage is committed); None: no checkpoints.
            The interval is ``cfg.run.checkpoint_every``.
    """

    stage: str
    cfg: Any
    private: bool
    ledger: Any = None
    metrics: Any = None
    target_epsilon: float | None = None
    target_delta: float | None = None
    seed: int = 0
    progress: bool = True
    policy_factory: Callable[..., Any] | None = None
    eval_prompts: Sequence[str] | None = None
    ray_storage: Path | None = None
    distributed: bool = False
    checkpoint_dir: Path | None = None
    plan: Any = None

    def log(self, key: str, value: float, *, step: int, private: bool = False, released: bool = False) -> None:
        """Log a scalar; a value derived from private data must be released (noised and accounted)."""
        if self.metrics is not None:
            self.metrics.log(key, float(value), step=step, stage=self.stage, private=private, released=released)


@dataclass(frozen=True)
class UserIndex:
    """Records grouped by user: the privacy unit of a stage.

    Attributes:
        user_keys: the distinct user ids, sorted (index u is user ``user_keys[u]``).
        record_user: [R] int64, the user index of every record.
    """

    user_keys: tuple[str, ...]
    record_user: Tensor

    @staticmethod
    def from_ids(user_ids: Sequence[str]) -> UserIndex:
        keys = tuple(sorted(set(user_ids)))
        where = {k: i for i, k in enumerate(keys)}
        return UserIndex(keys, torch.tensor([where[u] for u in user_ids], dtype=torch.int64))

    @property
    def num_users(self) -> int:
        return len(self.user_keys)

    @property
    def fingerprint(self) -> str:
        return user_set_fingerprint(self.user_keys)

    def records_of(self, users: Tensor) -> Tensor:
        """Record indices [R'] (ascending) of the sampled ``users`` [n]: every record of each sampled user."""
        if users.numel() == 0:
            return torch.zeros(0, dtype=torch.int64)
        mask = torch.isin(self.record_user, users)
        return torch.nonzero(mask).flatten()


def reproducible_noise(cfg: Any) -> bool:
    """``run.reproducible_noise``: the noise keyed by the public stage seed (tests and debugging; NOT private)."""
    return bool(getattr(getattr(cfg, "run", None), "reproducible_noise", False))


def secure_rng(cfg: Any) -> bool:
    """``privacy.secure_rng``: noise and samples from the SHAKE-256 CSPRNG instead of torch's generator."""
    return bool(getattr(getattr(cfg, "privacy", None), "secure_rng", False))


NOT_PRIVATE_WARNING = (
    "NOT PRIVATE: run.reproducible_noise=true keys the DP noise and the Poisson samples by the public seed in "
    "config.yaml; anyone who knows it can regenerate the noise and subtract it from the released weights. For tests "
    "and debugging only"
)


def noise_disclosure(cfg: Any, *, private: bool = True) -> dict[str, Any]:
    """What the report and the stage summaries say about the noise: secret or reproducible, which generator, and
    the not-private warning of a reproducible run (never the seed itself). ``private=False``: a non-private
    stage (no noise, samples from the public seed, no claim to warn about)."""
    secure = secure_rng(cfg)
    if not private:
        return {"secret": False, "secure_rng": secure, "warning": None,
                "description": "non-private stage: no noise; Poisson samples from the public stage seed"}
    secret = not reproducible_noise(cfg)
    return {
        "secret": secret,
        "secure_rng": secure,
        "description": describe_noise(secret=secret, secure_rng=secure),
        "warning": None if secret else NOT_PRIVATE_WARNING,
    }


def released_wall_time(ctx: StageContext, t0: float) -> float | None:
    """The stage's wall time since ``t0`` where it may be published, else None.

    A private stage's time depends on its realized (private) batch sizes and is not accounted, so it is published
    only with ``run.report_wall_time`` (documented as an unaccounted release); a non-private stage's always."""
    import time

    run = getattr(ctx.cfg, "run", None)
    if ctx.private and not bool(getattr(run, "report_wall_time", False)):
        return None
    return time.time() - t0


def spent_epsilon(ctx: StageContext) -> float:
    """Epsilon this stage has spent so far (public: computed from the ledger)."""
    if not ctx.private or ctx.ledger is None:
        return 0.0
    return float(ctx.ledger.epsilon(ctx.stage))


PRIVATE_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
"""A private stage's progress bar: no rate, elapsed or remaining time (they follow the private batch sizes)."""


def progress_bar(ctx: StageContext, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    timed = not ctx.private or bool(getattr(getattr(ctx.cfg, "run", None), "report_wall_time", False))
    return tqdm(total=total, desc=desc, disable=not ctx.progress, dynamic_ncols=True, leave=True,
                bar_format=None if timed else PRIVATE_BAR_FORMAT)


def public_lm_loss(model: torch.nn.Module, windows: Tensor, *, batch_size: int = 16) -> float:
    """Mean next-token loss of ``model`` on PUBLIC token windows [W, T] (free to log: no private data)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                ids = windows[i : i + batch_size]
                out = model(input_ids=ids, labels=ids)
                n = ids.numel() - ids.shape[0]
                total += float(out.loss) * n
                count += n
    finally:
        model.train(was)
    return total / max(count, 1)


def save_json(path: Path, data: dict[str, Any]) -> None:
    import json

    path.write_text(json.dumps(data, indent=2, sort_keys=True))

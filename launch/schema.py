"""The root run config: one section per component, each a small dataclass owned by that component.

Sections are added here as components land; a YAML file names sections and fields, and `dpalign <cmd> --help-config`
prints every field with its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cluster.config import DeepSpeedConfig, RayConfig
from controller.config import ControllerConfig
from launch.config import require
from trainers.data.config import DataConfig
from trainers.models.config import BaseModelConfig
from trainers.stages.config import (
    EngineConfig,
    EvalConfig,
    PPOConfig,
    PrivacyConfig,
    RewardModelConfig,
    SFTConfig,
    check_pipeline,
)


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
    """Global seed for everything that is not seeded by its own section: initializations, data, rollouts. It is
    PUBLIC (it is in config.yaml) and never keys the DP noise or the Poisson samples, which come from a secret drawn
    from OS entropy per stage execution (see run.reproducible_noise)."""
    reproducible_noise: bool = False
    """Tests and debugging only. true: the DP noise and the Poisson samples are keyed by the public seed, so a rerun
    is bit-for-bit identical -- and anyone who knows the seed can regenerate the noise and subtract it from the
    released weights: the run is NOT private, and its report and stage summaries say so. false (default): a fresh
    256-bit secret per stage execution, never written anywhere."""
    report_wall_time: bool = False
    """Publish the wall time of the private stages (report.json, report.md, stage summaries). It depends on the
    realized (private) batch sizes and is not accounted, so it is off by default; public phases (base model,
    evaluation) are always timed. Progress bars of private stages show no rate or elapsed time unless this is on."""
    checkpoint_every: int = 10
    """Steps (PPO: iterations) between mid-stage checkpoints of every stage's learner (RUN_DIR/checkpoints/<stage>/;
    also Ray Train's interval when ray.max_failures != 0). A crashed stage resumes from the later of its last
    checkpoint and the ledger's count of its steps; steps recorded after the checkpoint are skipped, never rerun
    (their privacy is spent). 0 disables checkpoints: a crash then loses every step before it."""

    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where the public metrics go besides metrics.jsonl: any subset of tensorboard, wandb, mlflow (the same rows,
    through one privacy filter). wandb and mlflow need the extra: pip install 'dpalign[loggers]'."""
    wandb_project: str = "dpalign"
    """W&B project of the run (run.loggers includes wandb)."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """W&B mode: offline writes RUN_DIR/wandb (upload later with `wandb sync`); online needs `wandb login`."""
    mlflow_tracking_uri: str = ""
    """MLflow tracking URI (run.loggers includes mlflow); empty: a file store in RUN_DIR/mlruns."""
    mlflow_experiment: str = "dpalign"
    """MLflow experiment the run is logged under."""

    def check(self) -> None:
        import importlib.util

        require(bool(self.name.strip()), "run.name", "must be a non-empty string")
        allowed = ("tensorboard", "wandb", "mlflow")
        for name in self.loggers:
            require(name in allowed, "run.loggers", f"unknown logger {name!r}; allowed: {', '.join(allowed)}")
        require(len(set(self.loggers)) == len(self.loggers), "run.loggers", "lists a logger twice")
        for name, module in (("wandb", "wandb"), ("mlflow", "mlflow")):
            require(name not in self.loggers or importlib.util.find_spec(module) is not None, "run.loggers",
                    f"includes {name} but {module} is not installed: pip install 'dpalign[loggers]'")
        require(self.seed >= 0, "run.seed", "must be >= 0")
        require(self.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0 (0: no mid-stage checkpoints)")


@dataclass
class RunConfig:
    """Everything one `dpalign run` needs."""

    run: RunSection = field(default_factory=RunSection)
    """Run directory, caches and seed."""
    data: DataConfig = field(default_factory=DataConfig)
    """The embedded task (or your own files): public corpus, private users, stage splits."""
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    """The base language model and its tokenizer (built and pretrained locally, or loaded by name)."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Target (epsilon, delta), preset (what is protected), budget split and accountant."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """How the DP engine clips and noises per-user gradients."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Stage 1: DP supervised fine-tuning on D1."""
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    """Stage 2: DP reward model on D2 (Bradley-Terry on preference pairs)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """Stage 3: DP-PPO on D3 against the private reward model."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation of the base, SFT and final policies on held-out public prompts."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray: cluster address (embedded by default), learner workers, failure handling, storage."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed ZeRO inside each learner (stage 0-3, offload, precision)."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """The learned clip/noise controller (SAC hyper-policy); off by default (fixed DP-SGD schedule)."""

    def check(self) -> None:
        check_pipeline(self.privacy, self.engine)
        if not self.model.name_or_path:  # a model built here: its context is known now (a hub model's at load)
            for name, stage in (("sft", self.sft), ("rm", self.rm)):
                require(
                    stage.max_len <= self.model.n_positions, f"{name}.max_len",
                    f"{stage.max_len} tokens per record exceed the base model's context (model.n_positions="
                    f"{self.model.n_positions}); lower {name}.max_len or raise model.n_positions",
                )
        require(
            not self.controller.enabled or self.privacy.accountant == "rdp" or not self.privacy.private_stages,
            "controller.enabled",
            "the controller chooses sigma and thresholds from earlier releases; set privacy.accountant=rdp "
            "(the RDP privacy filter is valid under adaptive composition)",
        )
        needs = {"module": "per_module", "lora_param": "per_tensor"}.get(self.controller.granularity)
        require(
            not self.controller.enabled or needs is None or self.engine.clipping == needs,
            "controller.granularity",
            f"{self.controller.granularity} sets one threshold per "
            f"{'adapted module' if needs == 'per_module' else 'LoRA A and LoRA B tensor'}, so the engine must clip "
            f"those groups: set engine.clipping={needs} (engine.clipping is {self.engine.clipping}), or use "
            "controller.granularity=bucket",
        )

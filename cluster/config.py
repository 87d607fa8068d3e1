"""Config of the Ray runtime, the learner workers and DeepSpeed inside them.

Two sections for the root RunConfig: ``ray`` (:class:`RayConfig`: where Ray runs and how many learners) and
``deepspeed`` (:class:`DeepSpeedConfig`: ZeRO stage, offload, precision). Plain dataclasses: importing this module
needs neither Ray nor DeepSpeed nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dpalign.config import require


@dataclass
class RayConfig:
    """Where Ray runs and how the learners (Ray Train ``TorchTrainer`` workers) are laid out."""

    address: str = ""
    """Ray cluster to join. Empty: the RAY_ADDRESS environment variable if set (what `ray job submit` sets),
    otherwise an embedded single-machine Ray started by this process. 'auto' joins a cluster already running on
    this machine; 'ray://host:10001' connects through Ray Client."""
    num_cpus: int = 0
    """Embedded Ray only: CPUs it may use (0: every core of the machine). Ignored when joining a cluster."""
    num_workers: int = 0
    """Learner workers (data-parallel ranks) of all three stages (SFT, reward model, PPO), as Ray Train workers.
    Each clips its share of the sampled users; the noise is added once to the global sum, so the update does not
    depend on this number. 0: the learner runs inside the driver process (no Ray Train; the test default)."""
    use_gpu: bool = False
    """One GPU per learner worker (NCCL process group); false uses CPUs and gloo."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per learner worker."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra custom Ray resources per learner worker (e.g. {'accelerator_type:A100': 0.01}); CPU and GPU come from
    cpus_per_worker and use_gpu."""
    max_failures: int = 0
    """Ray Train FailureConfig.max_failures: restarts of the learner group after a worker dies (-1: unlimited).
    A restart resumes from the last reported checkpoint; privacy events already on the ledger stay counted."""
    collective_timeout_s: int = 300
    """Seconds a learner waits in a collective (all-reduce) before failing. When one worker dies the others would
    otherwise wait in their next all-reduce for torch's default 30 minutes before Ray Train can restart the group."""
    storage_path: str = ""
    """Where Ray Train keeps checkpoints and results, including each learner stage's outputs (rank 0 reports the
    adapter and merged model as its final checkpoint; the driver copies them into the run directory). On a
    multi-node cluster this must be storage every node and the driver can reach (s3://, gs://, an NFS path).
    Empty: <run dir>/ray_train (enough on one machine)."""

    def check(self) -> None:
        require(self.num_cpus >= 0, "ray.num_cpus", "must be >= 0 (0: all cores)")
        require(self.num_workers >= 0, "ray.num_workers", "must be >= 0 (0: learners in the driver process)")
        require(self.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0")
        for key, value in self.resources_per_worker.items():
            require(
                key not in ("CPU", "GPU"),
                f"ray.resources_per_worker.{key}",
                "set CPUs with ray.cpus_per_worker and GPUs with ray.use_gpu",
            )
            require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                f"ray.resources_per_worker.{key}",
                f"got {value!r}; must be a number > 0",
            )
        require(self.max_failures >= -1, "ray.max_failures", "must be >= -1 (-1: unlimited)")
        require(self.collective_timeout_s >= 1, "ray.collective_timeout_s", "must be >= 1")
        require(
            self.address in ("", "auto", "local") or self.address.startswith("ray://") or ":" in self.address,
            "ray.address",
            f"got {self.address!r}; use '', 'auto', 'local', 'host:port' or 'ray://host:port'",
        )


@dataclass
class DeepSpeedConfig:
    """DeepSpeed inside each learner worker. The DP gradient (clipped, summed, noised, normalized, the same on
    every rank) is handed to DeepSpeed's optimizer; ZeRO only changes where optimizer state and weights live."""

    enabled: bool = False
    """Wrap the learner's model in a DeepSpeed engine; false applies the update with a plain torch optimizer."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 none, 1 optimizer state partitioned, 2 plus gradients, 3 plus parameters (the frozen base
    model is partitioned too; LoRA tensors stay whole, see param_persistence_threshold)."""
    offload_optimizer: bool = False
    """ZeRO >= 1: keep optimizer state (and the fp32 master weights) in CPU memory."""
    offload_param: bool = False
    """ZeRO-3 only: keep partitioned parameters in CPU memory between uses."""
    bf16: bool = False
    """Train in bfloat16 with fp32 master weights (GPUs with bf16 support)."""
    fp16: bool = False
    """Train in float16 with dynamic loss scaling (GPU only). A step skipped for overflow still has its privacy
    event on the ledger: the ledger over-counts, never under-counts."""
    param_persistence_threshold: int = 1_000_000
    """ZeRO-3: parameters with fewer elements than this are kept whole on every rank after their first use
    (stage3_param_persistence_threshold). The default keeps LoRA A/B and small heads whole, so the DP update on
    them needs no gather."""
    allgather_bucket_size: int = 50_000_000
    """ZeRO-1/2: elements per all-gather bucket (memory versus number of collectives)."""
    reduce_bucket_size: int = 50_000_000
    """ZeRO: elements per gradient reduce bucket."""

    def check(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
        require(not (self.bf16 and self.fp16), "deepspeed.bf16", "bf16 and fp16 are exclusive; pick one")
        require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "deepspeed.offload_optimizer",
            "needs deepspeed.zero_stage >= 1",
        )
        require(
            not self.offload_param or self.zero_stage == 3,
            "deepspeed.offload_param",
            "needs deepspeed.zero_stage=3",
        )
        require(
            self.param_persistence_threshold >= 0, "deepspeed.param_persistence_threshold", "must be >= 0"
        )
        require(self.allgather_bucket_size >= 1, "deepspeed.allgather_bucket_size", "must be >= 1")
        require(self.reduce_bucket_size >= 1, "deepspeed.reduce_bucket_size", "must be >= 1")

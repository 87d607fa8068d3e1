"""Data-parallel DP steps and DeepSpeed: how N learner ranks produce ONE differentially private update.

One DP step on N ranks (every rank runs the same code; torch.distributed is up, e.g. inside Ray Train workers):

  1. Sample. Every rank draws the SAME Poisson sample of users from a generator seeded by (seed, step)
     (:func:`poisson_sample`), then keeps its contiguous slice (:func:`shard_users`). The union of the slices is
     exactly one Poisson sample with rate q, so the privacy analysis is the single-process one; no user is seen
     by two ranks, none is dropped.
  2. Clip locally. Each rank computes per-user gradients of ITS users and sums the clipped contributions per group.
  3. Reduce. ``reduce_fn = allreduce_sum_fn()`` sums those per-group tensors in place across ranks (all_reduce SUM,
     gloo on CPU, nccl on GPU). Afterwards every rank holds the same global clipped sum.
  4. Noise once. Every rank adds noise drawn from a generator seeded by the same (seed, step): the SAME noise on
     the SAME sum, so all ranks hold the same noised update and the noise counts once (not N times, and not N
     independent draws that would average down to std/sqrt(N)). Normalize by the public B = q*N_users.
  5. Apply. Every rank applies the identical update: a plain optimizer, or DeepSpeed (:func:`deepspeed_apply_fn`).

Only rank 0 writes the privacy event (see ``cluster/ledger.py``); it is on disk before step 5.

DeepSpeed: :func:`init_deepspeed` wraps the model (optimizer over trainable parameters only) and
:func:`deepspeed_apply_fn` hands the finished DP gradient to DeepSpeed's optimizer through ``engine.backward`` on
a linear surrogate, so ZeRO-1/2/3 reduce and partition it with their own code (why: see that function).

torch and DeepSpeed are imported at the top of functions that need them only where heavy (DeepSpeed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from cluster.config import DeepSpeedConfig

ReduceFn = Callable[[list[Tensor]], None]
ApplyFn = Callable[[Sequence[Tensor]], None]

_REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Sampling and sharding (seeds: trainers.engine.sampling.step_seed, the one derivation of every random stream)


def poisson_sample(num_users: int, *, sampling_rate: float, seed: int, step: int) -> Tensor:
    """Indices (int64, sorted) of the users in step ``step``'s Poisson sample: each of ``num_users`` independently
    with probability ``sampling_rate``. Deterministic in (seed, step): every rank gets the same sample.

    The sample may be empty; an empty sample is a valid DP step (noise only). The same draw as the engine's
    ``PoissonUserSampler`` (streams from ``trainers.engine.sampling.step_seed``), so ranks and the single-process
    engine agree.
    """
    from trainers.engine.sampling import PoissonUserSampler

    return PoissonUserSampler(num_users, sampling_rate=sampling_rate, seed=seed).sample(step)  # [n_sampled]


def shard_users(sampled: Tensor | Sequence[int], *, rank: int, world_size: int) -> Tensor:
    """This rank's contiguous slice of the sampled users (sizes differ by at most one across ranks).

    Every rank passes the same ``sampled``; the slices are disjoint and cover it, so the ranks together process
    exactly one Poisson sample. A rank may get no users (small samples): it then contributes zeros to the sum.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    ids = torch.as_tensor(sampled, dtype=torch.int64).flatten()  # [n_sampled]
    return torch.tensor_split(ids, world_size)[rank]  # [~n_sampled / world_size]


# ----------------------------------------------------------------------------------------------------------------
# Reduction across ranks


def _require_process_group() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialized: run the learner inside Ray Train (cluster.train.run_learners) "
            "or torchrun, or call torch.distributed.init_process_group first"
        )


def allreduce_sum_fn(group: Any = None) -> ReduceFn:
    """The engine's ``reduce_fn``: sum the per-group clipped sums across ranks, in place.

    Called on the clipped per-user sums BEFORE noise, so each user's contribution enters the global sum once and
    the noise (added afterwards, identically on every rank) counts once. The tensors are flattened into one buffer
    per (dtype, device) so a step costs one collective, not one per LoRA module.

    Args:
        group: process group (None: the default group set up by Ray Train / torchrun).
    """
    import torch.distributed as dist

    _require_process_group()

    def reduce(tensors: list[Tensor]) -> None:
        if not tensors or dist.get_world_size(group) == 1:
            return
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.dtype, t.device), []).append(t)
        for same in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in same])  # [sum of numels]
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            offset = 0
            for t in same:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    return reduce


def assert_replicated(tensors: Sequence[Tensor], *, group: Any = None, what: str = "DP update") -> None:
    """Raise if ``tensors`` differ across ranks (e.g. a rank drew different noise or sampled other users).

    Cheap: one all_reduce of two scalars per tensor (max and -min of an fp64 checksum).
    """
    import torch.distributed as dist

    _require_process_group()
    if dist.get_world_size(group) == 1:
        return
    sums = torch.stack([t.detach().double().sum().cpu() for t in tensors])  # [n]
    hi, lo = sums.clone(), -sums
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX, group=group)
    bad = torch.nonzero(hi != -lo).flatten().tolist()
    if bad:
        raise RuntimeError(
            f"{what}: tensors {bad} differ across ranks; every rank must sample with the same seed and add noise "
            "from a generator seeded by the same (seed, step)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Python objects between ranks (PPO: rank 0's rollouts and beta; rank 0's privacy-filter answer)


def object_group() -> Any:
    """The process group for :func:`broadcast_object`: the default group when it is gloo, else a new gloo group.

    ``broadcast_object_list`` pickles into a byte tensor; on a NCCL group that tensor must live on the GPU, so
    objects travel on a separate gloo group (CPU) instead. Collective when it creates a group: every rank calls it.
    """
    import torch.distributed as dist

    _require_process_group()
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def broadcast_object(obj: Any, *, src: int = 0, group: Any = None) -> Any:
    """``obj`` from rank ``src`` on every rank (the other ranks pass anything, e.g. None). Collective."""
    import torch.distributed as dist

    _require_process_group()
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class SharedAdmission:
    """Rank 0's privacy-filter answer for each DP step, shared with the other ranks before the step's all-reduce.

    Why: only rank 0 consults the filter (``admit``) and writes the event (``event_sink``). When the filter refuses,
    rank 0 stops before its first collective of the step while the other ranks wait in the all-reduce of the
    clipped sums: they would block until ``ray.collective_timeout_s`` and fail the learner group, turning a clean
    "refused" stage into a crash. With this gate rank 0 broadcasts the outcome (True once the event is durable,
    False when refused or when the ledger call failed) and the other ranks read it right before release 0.

    Enabled only for a private stage on more than one rank (elsewhere nothing is sent or awaited); every rank must
    construct it with the same arguments.
    """

    def __init__(
        self, *, enabled: bool, is_main_process: bool, group: Any = None,
        payload: Callable[[], Any] | None = None, on_payload: Callable[[Any], None] | None = None,
    ) -> None:
        """``payload`` (rank 0) is sent with every admitted answer and handed to ``on_payload`` on the other ranks:
        the step's clip/noise plan, so the plan the event accounts for is the one every rank releases with."""
        self.enabled = enabled
        self.is_main_process = is_main_process
        self.group = group
        self.payload = payload
        self.on_payload = on_payload

    def wrap(self, hooks: Mapping[str, Any]) -> dict[str, Any]:
        """Rank 0's engine hooks with the broadcast added after the answer; other ranks' hooks unchanged."""
        out = dict(hooks)
        if not (self.enabled and self.is_main_process):
            return out
        if "event_sink" not in out:
            raise ValueError("SharedAdmission: rank 0 of a private stage needs an event_sink hook")
        admit, sink = out.get("admit"), out["event_sink"]

        def shared_admit(event: Any) -> Any:
            try:
                answer = admit(event)
            except BaseException:
                self._send(False)
                raise
            if not answer:
                self._send(False)
            return answer

        def shared_sink(event: Any) -> None:
            try:
                sink(event)
            except BaseException:
                self._send(False)
                raise
            self._send(True)

        if admit is not None:
            out["admit"] = shared_admit
        out["event_sink"] = shared_sink
        return out

    def admitted(self) -> bool:
        """On ranks other than 0: wait for rank 0's answer for the next step (call right before its release 0).

        Rank 0 (and a disabled gate) returns True at once: rank 0 learns a refusal from its own engine.
        """
        if not self.enabled or self.is_main_process:
            return True
        answer, payload = broadcast_object(None, group=self.group)
        if answer and self.on_payload is not None:
            self.on_payload(payload)
        return bool(answer)

    def _send(self, answer: bool) -> None:
        payload = self.payload() if answer and self.payload is not None else None
        broadcast_object((bool(answer), payload), group=self.group)


class RankZeroPolicy:
    """A clip/noise policy that decides on rank 0 only; the other ranks release with rank 0's plan.

    Why: a policy may depend on what only rank 0 sees or does (the learned controller evaluates on public data on
    rank 0, trains its SAC with its own randomness, asks the driver's filter), so the ranks cannot each run a copy
    and stay in step. Rank 0's plan for each step travels with its admission answer (:class:`SharedAdmission`
    ``payload``): it is the plan of the event on the ledger, and every rank clips and noises with it. Only rank 0
    observes releases (they are identical on every rank) and holds the policy's state.
    """

    def __init__(self, inner: Any, *, is_main_process: bool) -> None:
        if is_main_process and inner is None:
            raise ValueError("RankZeroPolicy: rank 0 needs the policy that decides the plans")
        self.inner = inner if is_main_process else None
        self.is_main_process = is_main_process
        self.last: tuple[int, Any] | None = None
        self._received: tuple[int, Any] | None = None

    def plan(self, step: int, groups: Any) -> Any:
        if self.is_main_process:
            plan = self.inner.plan(step, groups)
            self.last = (step, plan)
            return plan
        if self._received is None or self._received[0] != step:
            got = None if self._received is None else self._received[0]
            raise RuntimeError(f"rank 0's plan for step {step} did not arrive (last received: step {got})")
        return self._received[1]

    def observe(self, released: Any) -> None:
        if self.is_main_process:
            self.inner.observe(released)

    def receive(self, payload: tuple[int, Any]) -> None:
        """On other ranks: rank 0's (step, plan), delivered by the admission gate before the step."""
        self._received = payload

    def state_dict(self) -> Any:
        return self.inner.state_dict() if self.inner is not None and hasattr(self.inner, "state_dict") else None

    def load_state_dict(self, state: Any) -> None:
        if self.inner is not None and hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed


def build_deepspeed_config(cfg: DeepSpeedConfig, *, device: str = "cpu") -> dict[str, Any]:
    """DeepSpeed's JSON config for a DP learner.

    Fixed choices, and why:
      * gradient_accumulation_steps=1, micro batch 1: the DP engine does its own micro-batching and adds noise
        once per logical batch; DeepSpeed sees exactly one backward per DP step (its batch size is unused).
      * gradient_clipping=0: DP clipping is per user, before noise; a global clip in DeepSpeed would change the
        update (it is post-processing, so not a privacy bug, but it breaks equality with the reference).
      * zero_allow_untested_optimizer: the optimizer is a plain torch optimizer (CPU-Adam needs a compiled op).
      * stage3_param_persistence_threshold: LoRA A/B and heads stay whole on every rank after first use.

    Raises:
        ValueError: fp16 or bf16 asked for on CPU (the gloo backend and CPU kernels are fp32 here).
    """
    if device == "cpu" and (cfg.fp16 or cfg.bf16):
        raise ValueError(
            "deepspeed.fp16/deepspeed.bf16: not supported on CPU learners; set both to false or use GPUs "
            "(ray.use_gpu=true)"
        )
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "reduce_bucket_size": cfg.reduce_bucket_size}
    if cfg.zero_stage in (1, 2):
        zero.update(allgather_bucket_size=cfg.allgather_bucket_size, contiguous_gradients=True)
    if cfg.zero_stage == 3:
        zero.update(
            stage3_param_persistence_threshold=cfg.param_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device != "cpu"}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device != "cpu"}
    zero["overlap_comm"] = device != "cpu"
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # Offloading with a torch optimizer (not DeepSpeedCPUAdam, which needs a compiled extension).
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {"enabled": cfg.fp16},
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable tensor, in module order: the order of ``deepspeed_apply_fn``'s grads.

    Names are those of ``model`` (pass ``engine.module`` for a DeepSpeed engine).
    """
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_shape(p: Tensor) -> torch.Size:
    """The full shape of a parameter, also when ZeRO-3 has partitioned it (then ``p.shape`` is [0] outside
    forward and the full shape is ``p.ds_shape``). Allocate per-group sums and noise with this shape."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


def _ensure_process_group(backend: str) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"DeepSpeed needs a process group and {', '.join(missing)} is not set: run the learner inside Ray Train "
            "(cluster.train.run_learners) or torchrun, or export RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT "
            "(single process: RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500)"
        )
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def init_deepspeed(
    model: nn.Module,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    ds_cfg: DeepSpeedConfig,
    *,
    device: str | None = None,
) -> tuple[Any, Any]:
    """Wrap ``model`` in a DeepSpeed engine whose optimizer holds only the trainable parameters.

    Call after the LoRA adapters exist and the model is on its device (an optimizer built earlier trains nothing).
    The frozen base model is partitioned too under ZeRO-3; it is never in the optimizer.

    Args:
        model: the model with adapters (peft model); its trainable parameters are LoRA A/B and heads.
        make_optimizer: builds the torch optimizer from the trainable parameters, e.g.
            ``lambda ps: torch.optim.AdamW(ps, lr=1e-3)``. Plain torch optimizers work everywhere; DeepSpeed's
            fused/CPU Adam needs a compiled extension.
        ds_cfg: ZeRO stage, offload, precision.
        device: 'cpu' or 'cuda' (None: cuda if available). Selects gloo or nccl and the allowed precisions.

    Returns:
        (engine, optimizer): ``engine.module`` is ``model``; apply DP updates with :func:`deepspeed_apply_fn`.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # DeepSpeed JIT-compiles its ops once; keep them in the repo cache, not ~/.cache (Makefile does the same).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO_ROOT / ".cache" / "torch_extensions"))
    _ensure_process_group("nccl" if device == "cuda" else "gloo")
    import deepspeed

    trainable = [p for _, p in trainable_named_parameters(model)]
    if not trainable:
        raise ValueError("init_deepspeed: the model has no trainable parameter; add the LoRA adapters first")
    optimizer = make_optimizer(trainable)
    in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if in_opt != {id(p) for p in trainable}:
        raise ValueError(
            "init_deepspeed: make_optimizer must return an optimizer over exactly the parameters it is given "
            f"({len(trainable)} trainable tensors, optimizer has {len(in_opt)})"
        )
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=trainable,
        config=build_deepspeed_config(ds_cfg, device=device),
    )
    return engine, ds_optimizer


def deepspeed_apply_fn(engine: Any) -> ApplyFn:
    """The engine's ``apply_fn`` under DeepSpeed: make DeepSpeed's optimizer apply the finished DP gradient.

    ``grads[i]`` is the final gradient (clipped, summed, noised, divided by q*N) of the i-th tensor of
    ``trainable_named_parameters(engine.module)``, identical on every rank.

    Method: a linear surrogate ``s = sum_i <p_i, g_i>`` has ds/dp_i = g_i exactly, so ``engine.backward(s)``
    makes DeepSpeed's own hooks see the gradient g_i and reduce, bucket and partition it as they would any
    gradient (ZeRO-2: each rank keeps the reduced slice of its partition; ZeRO-3: reduce-scatter into the fp32
    partition), then ``engine.step()`` runs the optimizer on the partitions and re-gathers weights. This uses only
    DeepSpeed's public API, unlike writing into its private fp32 partitions, whose layout changes between
    versions. DeepSpeed averages gradients over ranks; the averaged g is g because g is the same on every rank
    (the cost is one redundant reduce of LoRA-sized tensors per step). Gradient accumulation is 1 and predivide
    is off (build_deepspeed_config), so no other factor enters. Under ZeRO-3 a parameter outside forward may be
    a partitioned placeholder; GatheredParameters makes those whole for the surrogate (persistent LoRA tensors,
    see param_persistence_threshold, are whole already and left alone) and the gradient hook receives the
    full-shape g.

    Precondition: no other backward through DeepSpeed-managed trainable parameters between two applies. ZeRO-1/2/3
    hook every trainable parameter's gradient accumulation; a per-user backward that accumulates into ``p.grad``
    (``loss.backward()``) feeds the raw, unclipped gradient into DeepSpeed's buckets. Per-user gradients must be
    computed without accumulating parameter gradients (``torch.autograd.grad``, or
    ``backward(inputs=<module outputs>)``).

    Tested: after one step, parameters under ZeRO-2 and ZeRO-3 equal a plain torch optimizer applying g.
    """
    import deepspeed

    named = trainable_named_parameters(engine.module)
    params = [p for _, p in named]
    stage3 = engine.zero_optimization_stage() == 3
    if engine.gradient_accumulation_steps() != 1:
        raise ValueError(
            "deepspeed_apply_fn: gradient_accumulation_steps must be 1 (the DP engine accumulates)"
        )

    def apply(grads: Sequence[Tensor]) -> None:
        if len(grads) != len(params):
            raise ValueError(
                f"deepspeed_apply_fn: got {len(grads)} gradients for {len(params)} trainable tensors "
                f"({', '.join(n for n, _ in named[:3])}, ...)"
            )
        # Only partitioned placeholders need a gather; persistent LoRA tensors are already whole, and gathering
        # them would also re-partition ("free") them on exit while modules may still hold them.
        missing = [p for p in params if stage3 and _zero3_partitioned(p)]
        with deepspeed.zero.GatheredParameters(missing, modifier_rank=None, enabled=bool(missing)):
            for (name, p), g in zip(named, grads, strict=True):
                if tuple(g.shape) != tuple(p.shape):
                    raise ValueError(
                        f"deepspeed_apply_fn: gradient for {name} has shape {tuple(g.shape)}, "
                        f"parameter has {tuple(p.shape)}"
                    )
            surrogate = sum(
                (p * g.detach().to(device=p.device, dtype=p.dtype)).sum()
                for p, g in zip(params, grads, strict=True)
            )
            engine.backward(surrogate)
        engine.step()

    return apply


def _zero3_partitioned(p: Tensor) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE


def gather_trainable_state(engine: Any) -> dict[str, Tensor]:
    """{name: full CPU copy} of every trainable tensor (LoRA A/B, heads), on every rank, also under ZeRO-3.

    Collective under ZeRO-3 (every rank must call it). What rank 0 saves as the adapter checkpoint and what goes
    to the rollout actors (only LoRA weights travel, DESIGN §4).
    """
    import deepspeed

    named = trainable_named_parameters(engine.module)
    stage3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None, enabled=stage3):
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


def deepspeed_named_grads(grads: Mapping[str, Tensor], engine: Any) -> list[Tensor]:
    """Order a {parameter name: gradient} mapping like ``trainable_named_parameters(engine.module)``."""
    names = [n for n, _ in trainable_named_parameters(engine.module)]
    missing = [n for n in names if n not in grads]
    if missing:
        raise KeyError(f"no gradient for trainable parameter(s) {missing[:3]}")
    return [grads[n] for n in names]

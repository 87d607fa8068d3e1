"""The DP gradient engine: a batch of sampled users -> one differentially private update (docs/design.md section 2).

One release (``DPEngine.step``), in order:

  1. Plan. At the first release of a logical step, ask the policy for (C_k, s_k[, sigma_b]); compute sigma_eff
     with ``accounting.mechanisms`` (never the policy's own claim).
  2. Admit and record. Build ``PrivacyEvent(stage, step, "gradient", q, sigma_eff, repeats=K)``; ask ``admit``
     (the privacy filter) and raise ``BudgetExceededError`` if refused -- nothing is computed or applied; then hand
     the event to ``event_sink`` (the write-ahead ledger) BEFORE anything is released. Both only where
     ``is_main_process``. K releases of the same sample (PPO epochs) are ONE event with repeats=K, emitted before
     the first; each release is still a full noisy release with fresh noise.
  3. Per-user gradients. Split the records into physical micro-batches under the caps; per micro-batch,
     forward -> per-record loss [R] -> ``loss.sum().backward()``; hooks add each record's gradient into its
     user's row. A user's records may span micro-batches: all are summed BEFORE clipping.
  4. Clip per group: user u's group-k gradient is scaled by min(1, C_k / ||g_uk||); sum over users.
  5. ``reduce_fn`` (data parallel: all-reduce SUM of the clipped sums and clip counts, in place), before noise.
  6. Noise once: s_k * N(0, I) on group k from the (secret seed, step, release) stream -- identical on every
     rank, so it counts once. Clip counts are released CENTRED (Andrew et al. 2021): sum_u (b_uk - 1/2) +
     N(0, sigma_b^2), sensitivity 1/2 per group as ``accounting.mechanisms`` accounts, then the public B/2 is
     added back (post-processing) so the policy reads an estimate of the raw count.
  7. Divide by the PUBLIC B = q * N (never the realized number of users) and ``apply_fn`` (default: write into
     ``param.grad``; the caller's optimizer steps). ``policy.observe`` sees only the released quantities.

Empty samples are valid steps (noise only). Non-private mode runs steps 3-7 without event, admit, clipping or
noise (or with the policy's plan, if one is given: clipping-only baselines) and the SAME public normalization
q * N, so non-private training equals the DP engine with sigma = 0 and C = inf.

The per-record loss contract: ``loss_fn(records) -> Tensor [R]``, one value per record, computed from that record
alone -- no batch mean, no batch-wide whitening or normalization, no batch norm. The engine refuses batch-norm
models and, on the first step, checks that each of two records' loss is the same computed alone as in the batch.
Write it as in ``trainers.rlhf`` (e.g. ``causal_lm_loss_per_record(model(ids).logits, ids, mask)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from accounting.events import PrivacyEvent
from accounting.ledger import BudgetExceededError
from accounting.mechanisms import effective_noise_multiplier
from trainers.engine.per_user import (
    PerUserGrad,
    PerUserGradCollector,
    PerUserMode,
    check_no_cross_example_modules,
    sq_norms,
    weighted_sum,
)
from trainers.engine.policy import ClipNoisePolicy, GroupSpec, ReleasedStep, StepPlan
from trainers.engine.sampling import NoiseSeed, release_generator
from trainers.precision import autocast, full_precision

ReduceFn = Callable[[list[Tensor]], None]
ApplyFn = Callable[[Sequence[Tensor]], None]
EventSink = Callable[[PrivacyEvent], None]
AdmitFn = Callable[[PrivacyEvent], Any]
LossFn = Callable[[Any], Tensor]
Grouping = Literal["module", "per_tensor", "flat"]

_EPS = 1e-12  # in min(1, C / (norm + eps)): keeps the scaled norm strictly below C, matches the references


class RecordIndependenceError(ValueError):
    """The per-record loss of a record changes with the other records in its batch (the loss mixes records)."""


class FrozenAdapterError(RuntimeError):
    """The trainable weights did not change after the first applied update (adapters not trained)."""


@dataclass(frozen=True)
class UserBatch:
    """The records of one Poisson sample of users.

    Attributes:
        records: a mapping of tensors sharing the leading dimension R (``{"input_ids": [R, L], ...}``), or an
            object with ``select(index: Tensor) -> same type`` (e.g. ``trainers.rlhf.experience.Experience``).
        user_ids: [R] int64, the user of each record (any integers; equal for the records of one user).
        record_tokens: optional [R] int64 token cost of each record for ``max_tokens_per_microbatch``; default
            the padded width of ``records["input_ids"]`` (or of the first 2-D tensor).
    """

    records: Any
    user_ids: Tensor
    record_tokens: Tensor | None = None

    @property
    def num_records(self) -> int:
        return int(self.user_ids.numel())

    @staticmethod
    def empty() -> UserBatch:
        """An empty sample: a valid DP step whose release is noise only."""
        return UserBatch(records={}, user_ids=torch.zeros(0, dtype=torch.int64))


@dataclass(frozen=True)
class StepResult:
    """What one release did (public quantities only).

    Attributes:
        step: logical step index; release: index within the step (0 .. repeats-1).
        event: the ledger event of the step (emitted at release 0; None in non-private mode).
        released: what the policy observed (None in non-private mode without a policy).
        num_microbatches: physical micro-batches run. It depends on the realized number of records, which is
            private: do not log or release it without noise.
    """

    step: int
    release: int
    event: PrivacyEvent | None
    released: ReleasedStep | None
    num_microbatches: int


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable tensor in module order: the order of gradients given to ``apply_fn``
    and of noise draws (the same as ``trainers.distributed.trainable_named_parameters``)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def clipping_groups(
    model: nn.Module, params: list[tuple[str, nn.Parameter]], grouping: Grouping
) -> list[tuple[str, list[int]]]:
    """Clipping groups as (name, indices into ``params``), in module order.

    ``module``: one group per adapted LoRA module (its A and B of every adapter together, named like
    ``trainers.models.lora.lora_groups``) and one per other module owning trainable tensors (a head: weight and
    bias together). ``per_tensor``: one group per tensor. ``flat``: one group ``"all"``.
    """
    if grouping == "flat":
        return [("all", list(range(len(params))))]
    if grouping == "per_tensor":
        return [(name, [i]) for i, (name, _) in enumerate(params)]
    if grouping != "module":
        raise ValueError(f"grouping={grouping!r}: use 'module', 'per_tensor' or 'flat'")
    groups: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(params):
        parts = name.split(".")
        if "lora_A" in parts or "lora_B" in parts:  # ...c_attn.lora_A.default.weight -> ...c_attn
            cut = parts.index("lora_A") if "lora_A" in parts else parts.index("lora_B")
            key = ".".join(parts[:cut])
        else:
            key = ".".join(parts[:-1]) or name
        for prefix in ("base_model.model.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        groups.setdefault(key, []).append(i)
    return list(groups.items())


def _select(records: Any, index: Tensor, num_records: int) -> Any:
    if isinstance(records, Mapping):
        out = {}
        for key, value in records.items():
            if not isinstance(value, Tensor) or value.shape[:1] != (num_records,):
                raise ValueError(
                    f"records[{key!r}]: every field must be a tensor with leading dimension R={num_records} "
                    f"(got {type(value).__name__} {tuple(getattr(value, 'shape', ()))}); put per-batch constants "
                    "in the loss function's closure"
                )
            out[key] = value[index.to(value.device)]
        return out
    if hasattr(records, "select"):
        return records.select(index)
    raise TypeError(
        f"records of type {type(records).__name__}: pass a mapping of [R, ...] tensors or an object with select(index)"
    )


class DPEngine:
    """Turns a batch of Poisson-sampled users into one DP update per release; see the module docstring.

    Build it after the LoRA adapters exist, the model is on its device and the optimizer is built.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        stage: str,
        sampling_rate: float,
        num_users: int,
        seed: int | NoiseSeed | None = None,
        policy: ClipNoisePolicy | None,
        private: bool = True,
        event_sink: EventSink | None = None,
        admit: AdmitFn | None = None,
        grouping: Grouping = "module",
        max_records_per_microbatch: int | None = None,
        max_tokens_per_microbatch: int | None = None,
        reduce_fn: ReduceFn | None = None,
        apply_fn: ApplyFn | None = None,
        is_main_process: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        check_record_independence: bool = True,
        check_weights_move: bool = True,
        start_step: int = 0,
        per_user_mode: PerUserMode = "auto",
        mixed_precision: bool = True,
    ) -> None:
        """Args:
        stage: ledger stage name ("sft", "rm", "ppo", ...).
        sampling_rate: Poisson rate q the batches were sampled with (``PoissonUserSampler``).
        num_users: N, users in the stage's private data; B = q * N is the public normalizer.
        seed: the key of the noise streams, the same on every rank: a secret ``NoiseSeed`` (what the stages pass,
            see ``trainers.engine.sampling``); None draws a fresh secret here (one process only); a plain int is a
            PUBLIC, reproducible seed (tests and debugging: not private against anyone who knows it).
        policy: clip/noise policy; required when private. Non-private: None gives plain summed gradients,
            a policy gives clipping (and noise) per its plan without accounting (baselines only).
        private: False for non-private baselines (no event, no admit).
        event_sink: receives each step's PrivacyEvent before its release; required when private on the main
            process (e.g. ``ledger.record``).
        admit: privacy filter (e.g. ``ledger.admit``); a falsy answer stops the step with BudgetExceededError.
        grouping: clipping groups ("module", "per_tensor", "flat").
        max_records_per_microbatch / max_tokens_per_microbatch: physical micro-batch caps (None: no cap).
        reduce_fn: in-place sum across data-parallel ranks of the clipped sums (before noise).
        apply_fn: receives the final gradient per trainable tensor (module order); default writes ``.grad``.
        is_main_process: only the main process consults ``admit`` and emits events.
        optimizer: if given, checked to hold every trainable LoRA tensor.
        check_record_independence: on the first step, verify that the loss of a record does not depend on the
            other records of its micro-batch.
        check_weights_move: at the second step, fail if the first non-zero update did not change the weights.
        start_step: first logical step index (resume).
        per_user_mode: how per-user gradient norms are computed (``trainers.engine.per_user``): ``auto`` picks per
            module ghost norms or materialised per-user gradients, whichever costs less; ``materialize`` and
            ``ghost`` force one (tests and benchmarks). The release is the same up to float rounding.
        mixed_precision: run the loss's forward under bf16 autocast when the model is on a CUDA device with bf16
            (``trainers.precision``); per-user gradients, norms, clipping and noise stay fp32. No effect on CPU.
        """
        if not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"sampling_rate={sampling_rate}: must be in (0, 1]")
        if num_users < 1:
            raise ValueError(f"num_users={num_users}: must be >= 1")
        if start_step < 0:
            raise ValueError(f"start_step={start_step}: must be >= 0")
        if seed is None and reduce_fn is not None:
            raise ValueError(
                "seed=None draws a secret in this process, but reduce_fn says ranks share one update: every rank "
                "needs the SAME secret (rank 0 draws it and broadcasts it, trainers.stages.learner.stage_noise_seed)"
            )
        for field, cap in (("max_records_per_microbatch", max_records_per_microbatch),
                           ("max_tokens_per_microbatch", max_tokens_per_microbatch)):
            if cap is not None and cap < 1:
                raise ValueError(f"{field}={cap}: must be >= 1 or None")
        if private and policy is None:
            raise ValueError("private=True needs a clip/noise policy (e.g. FixedPolicy(noise_multiplier=..., clip_norm=...))")
        if private and is_main_process and event_sink is None:
            raise ValueError(
                "private=True on the main process needs event_sink (e.g. ledger.record): every noisy release must "
                "be written to the ledger before it is used"
            )
        check_no_cross_example_modules(model)
        self.model = model
        self.params = trainable_named_parameters(model)
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no trainable parameter; add LoRA adapters (add_lora) first")
        if any("lora_" in n for n, _ in model.named_parameters()):
            from trainers.models.lora import assert_trainable_lora

            assert_trainable_lora(model, optimizer)
        self.stage = stage
        self.sampling_rate = float(sampling_rate)
        self.num_users = int(num_users)
        self.seed = NoiseSeed.draw() if seed is None else NoiseSeed.of(seed)
        self.policy = policy
        self.private = private
        self.event_sink = event_sink
        self.admit = admit
        self.max_records = max_records_per_microbatch
        self.max_tokens = max_tokens_per_microbatch
        self.reduce_fn = reduce_fn
        self.apply_fn = apply_fn or self._write_grads
        self.is_main_process = is_main_process
        self.mixed_precision = bool(mixed_precision)
        self._device = self.params[0][1].device
        self._check_independence = check_record_independence
        self._check_move = check_weights_move
        raw_groups = clipping_groups(model, self.params, grouping)
        self.group_members = [idx for _, idx in raw_groups]
        self.groups = tuple(
            GroupSpec(
                name=name,
                numel=sum(self.params[i][1].numel() for i in idx),
                param_names=tuple(self.params[i][0] for i in idx),
            )
            for name, idx in raw_groups
        )
        self.group_of_param = [0] * len(self.params)
        for k, idx in enumerate(self.group_members):
            for i in idx:
                self.group_of_param[i] = k
        self._collector = PerUserGradCollector(model, self.params, per_user_mode) if policy is not None else None
        self.next_step = int(start_step)
        self.last_plan: StepPlan | None = None  # the plan of the latest private step (public: chosen before it)
        self._open: tuple[int, int, int, StepPlan | None, PrivacyEvent | None, Tensor] | None = None
        self._snapshot: list[Tensor] | None = None

    # ------------------------------------------------------------------------------------------------------------

    @property
    def expected_batch_size(self) -> float:
        """The public normalizer B = q * N."""
        return self.sampling_rate * self.num_users

    def mechanism(self) -> dict[str, Any] | None:
        """The latest private step's mechanism, for the report: enough to recompute its sigma_eff by hand.

        ``grad_noise_multiplier`` is the gradient release's (sum_k C_k^2 / s_k^2)^(-1/2); ``count_noise_std`` the
        std sigma_b on each of the ``num_groups`` CENTRED clip counts (sensitivity 1/2; None: no counts), so
        ``sigma_eff = (grad_noise_multiplier^-2 + num_groups * (2 sigma_b)^-2)^(-1/2)`` (only the gradient's
        multiplier without counts). None before any private step.
        """
        plan = self.last_plan
        if plan is None:
            return None
        return {
            "grad_noise_multiplier": effective_noise_multiplier(clip_norms=plan.clip_norms, noise_stds=plan.noise_stds),
            "count_noise_std": plan.count_noise_std,
            "num_groups": plan.num_groups,
            "sigma_eff": plan.effective_noise_multiplier(),
        }

    def close(self) -> None:
        """Remove the engine's hooks from the model."""
        if self._collector is not None:
            self._collector.close()

    def _write_grads(self, grads: Sequence[Tensor]) -> None:
        for (_, p), g in zip(self.params, grads, strict=True):
            p.grad = g.to(device=p.device, dtype=p.dtype)

    def microbatches(self, batch: UserBatch) -> list[Tensor]:
        """Record indices of each physical micro-batch, contiguous in record order, under both caps."""
        r = batch.num_records
        if r == 0:
            return []
        if batch.record_tokens is not None:
            tokens = [int(t) for t in batch.record_tokens.tolist()]
        elif self.max_tokens is not None:
            width = self._padded_width(batch.records)
            tokens = [width] * r
        else:
            tokens = [0] * r
        if self.max_tokens is not None and max(tokens) > self.max_tokens:
            raise ValueError(
                f"a record has {max(tokens)} tokens, over max_tokens_per_microbatch={self.max_tokens}; raise the cap"
            )
        out, start, used = [], 0, 0
        for i in range(r):
            full_records = self.max_records is not None and i - start >= self.max_records
            full_tokens = self.max_tokens is not None and used + tokens[i] > self.max_tokens
            if i > start and (full_records or full_tokens):
                out.append(torch.arange(start, i))
                start, used = i, 0
            used += tokens[i]
        out.append(torch.arange(start, r))
        return out

    @staticmethod
    def _padded_width(records: Any) -> int:
        if isinstance(records, Mapping):
            if isinstance(records.get("input_ids"), Tensor) and records["input_ids"].dim() >= 2:
                return int(records["input_ids"].shape[1])
            for value in records.values():
                if isinstance(value, Tensor) and value.dim() >= 2:
                    return int(value.shape[1])
        raise ValueError(
            "max_tokens_per_microbatch needs UserBatch.record_tokens or a records mapping with 2-D input_ids"
        )

    # ------------------------------------------------------------------------------------------------------------

    def _loss(self, loss_fn: LossFn, records: Any, r: int) -> Tensor:
        loss = loss_fn(records)
        if not isinstance(loss, Tensor) or loss.shape != (r,):
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return one loss per record, shape [{r}], got {shape}; a reduced (mean/sum) loss mixes "
                "records and cannot be clipped per user -- return e.g. causal_lm_loss_per_record(...) unreduced"
            )
        return loss

    def _check_records_independent(self, batch: UserBatch, loss_fn: LossFn, index: Tensor) -> None:
        """Each of two records' loss must be the same alone as inside its micro-batch (eval mode: no dropout)."""
        if index.numel() < 2:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                full = self._loss(loss_fn, _select(batch.records, index, batch.num_records), index.numel())
                for pos in (0, index.numel() - 1):
                    one = index[pos : pos + 1]
                    alone = self._loss(loss_fn, _select(batch.records, one, batch.num_records), 1)[0]
                    if not torch.allclose(alone.float(), full[pos].float(), rtol=1e-3, atol=1e-4):
                        raise RecordIndependenceError(
                            f"record {int(one)}'s loss is {float(full[pos]):.6g} in its micro-batch but "
                            f"{float(alone):.6g} alone: loss_fn mixes records (batch mean, batch-wide whitening or "
                            "normalization, batch statistics). Compute every term from the record itself"
                        )
        finally:
            self.model.train(was_training)

    def per_user_gradients(self, batch: UserBatch, loss_fn: LossFn) -> tuple[Tensor, list[PerUserGrad]]:
        """Raw per-user gradients: (user ids [U] sorted, per trainable tensor [U, *shape] float32 or a ``GhostGrad``
        holding its factors; ``trainers.engine.per_user.as_tensor`` materialises either).

        PRIVATE data: the engine reads their norms and clipped sum; tests and audits may compare them; never log
        or release these.
        """
        if self._collector is None:
            raise ValueError("per_user_gradients needs an engine built with a policy")
        users, slots = torch.unique(batch.user_ids, sorted=True, return_inverse=True)  # [U], [R]
        self._collector.begin(int(users.numel()), torch.bincount(slots.cpu(), minlength=int(users.numel())))
        saved = [p.grad for _, p in self.params]
        try:
            for index in self.microbatches(batch):
                records = _select(batch.records, index, batch.num_records)
                with self._collector.capturing(slots[index].to(self._device)):
                    with autocast(self._device, enabled=self.mixed_precision):
                        loss = self._loss(loss_fn, records, index.numel())
                    # Differentiate w.r.t. the hooked modules' OUTPUTS only: their hooks build the per-record
                    # gradients, and no parameter .grad is touched -- so DeepSpeed's ZeRO-2/3 gradient hooks never
                    # see (and never reduce) the unclipped sum, and frozen weights cost no gradient at all.
                    outputs = self._collector.outputs
                    if outputs:
                        torch.autograd.grad(loss.sum(), outputs, allow_unused=True)
        finally:
            for (_, p), g in zip(self.params, saved, strict=True):
                p.grad = g
        return users, self._collector.grads()

    def _summed_gradients(self, batch: UserBatch, loss_fn: LossFn) -> list[Tensor]:
        """Non-private: the sum over records of each record's gradient, per trainable tensor (plain autograd)."""
        params = [p for _, p in self.params]
        sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        for index in self.microbatches(batch):
            records = _select(batch.records, index, batch.num_records)
            with autocast(self._device, enabled=self.mixed_precision):
                loss = self._loss(loss_fn, records, index.numel())
            grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
            for s, g in zip(sums, grads, strict=True):
                if g is not None:
                    s += g.float()
        return sums

    def clip_and_sum(
        self, per_user: list[PerUserGrad], clip_norms: Sequence[float]
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Clip each user's group-k gradient to C_k and sum over users.

        Only the clipped sums are materialised: a ghost tensor's norms come from its Gram matrices and its sum
        from one matmul with the rows scaled by their user's factor (``trainers.engine.per_user``).

        Returns:
            (sums per tensor [*shape], unclipped counts per group [K] float32, scale factors [K, U]).
            A count is the number of users whose group norm was <= C_k (private until noised).
        """
        num_users = per_user[0].shape[0]
        device = self.params[0][1].device
        scales = torch.ones(len(self.groups), num_users, device=device)  # [K, U]
        counts = torch.zeros(len(self.groups), device=device)  # [K]
        for k, members in enumerate(self.group_members):
            c = clip_norms[k]
            sq = sum(sq_norms(per_user[i]) for i in members)  # [U]
            norms = torch.sqrt(sq)  # [U]
            if not math.isinf(c):
                scales[k] = torch.clamp(c / (norms + _EPS), max=1.0)
            counts[k] = (norms <= c).sum()
        sums = [weighted_sum(g, scales[self.group_of_param[i]]) for i, g in enumerate(per_user)]  # each [*shape]
        return sums, counts, scales

    @staticmethod
    def centred_counts(counts: Tensor, num_users: int) -> Tensor:
        """The quantity released for the clip counts: sum over this rank's ``num_users`` users of (b_uk - 1/2),
        [K]. One user moves it by 1/2 -- the sensitivity ``accounting.mechanisms`` accounts (a raw count would
        move by 1)."""
        return counts - 0.5 * num_users

    def count_offset(self) -> float:
        """The public B/2 added back to the noisy centred counts (post-processing): an estimate of the raw count."""
        return self.expected_batch_size / 2.0

    # ------------------------------------------------------------------------------------------------------------

    def step(self, batch: UserBatch, loss_fn: LossFn, *, repeats: int = 1, release: int = 0) -> StepResult:
        """One release on ``batch`` (release ``release`` of ``repeats`` on the same sample); applies the update.

        For K PPO epochs over one sample call ``step(batch, loss_fn, repeats=K, release=k)`` for k = 0..K-1, with
        the optimizer stepping in between; the event (repeats=K) is emitted once, before release 0, and every
        release draws fresh noise. A new sample is always a new logical step.

        Raises:
            BudgetExceededError: the privacy filter refused the step (nothing was released or applied).
            RecordIndependenceError, ValueError: the loss or the batch breaks the contract.
            FrozenAdapterError: the first update did not move the weights.
        """
        if repeats < 1 or not 0 <= release < repeats:
            raise ValueError(f"release={release}, repeats={repeats}: need repeats >= 1 and 0 <= release < repeats")
        self._check_moved()
        if self._check_independence and batch.num_records >= 2:  # before the event: a refused loss costs nothing
            self._check_records_independent(batch, loss_fn, self.microbatches(batch)[0])
            self._check_independence = False
        if release == 0:
            if self._open is not None:
                s, last, k = self._open[0], self._open[1], self._open[2]
                raise ValueError(f"step {s} has released {last + 1} of its {k} repeats; finish it before a new sample")
            step = self.next_step
            plan = self.policy.plan(step, self.groups) if self.policy is not None else None
            if plan is not None and plan.num_groups != len(self.groups):
                raise ValueError(f"policy planned {plan.num_groups} groups; the engine has {len(self.groups)}")
            event = self._admit_and_record(step, plan, repeats) if self.private else None
            if event is not None:
                self.last_plan = plan
            self._open = (step, 0, repeats, plan, event, batch.user_ids.clone())
        else:
            if self._open is None or self._open[1] != release - 1 or self._open[2] != repeats:
                raise ValueError(f"release {release} of {repeats}: the previous release of this sample was not made")
            if not torch.equal(self._open[5], batch.user_ids):
                raise ValueError("a reused sample (release > 0) must have the same records as release 0")
            step, _, _, plan, event = self._open[:5]
            self._open = (step, release, repeats, plan, event, self._open[5])
        if release == repeats - 1:
            self._open = None
            self.next_step = step + 1

        num_mb = len(self.microbatches(batch))
        released = None
        if plan is None:
            sums = self._summed_gradients(batch, loss_fn)
            if self.reduce_fn is not None:
                self.reduce_fn(sums)
            grads = [s / self.expected_batch_size for s in sums]
        else:
            grads, released = self._private_release(batch, loss_fn, step, release, plan)
        self._remember(grads)
        self.apply_fn(grads)
        if released is not None:
            self.policy.observe(released)
        return StepResult(step=step, release=release, event=event, released=released, num_microbatches=num_mb)

    def _admit_and_record(self, step: int, plan: StepPlan | None, repeats: int) -> PrivacyEvent:
        assert plan is not None
        sigma_eff = plan.effective_noise_multiplier()
        event = PrivacyEvent(
            stage=self.stage,
            step=step,
            purpose="gradient",
            sampling_rate=self.sampling_rate,
            noise_multiplier=sigma_eff,
            repeats=repeats,
        )
        if self.is_main_process:
            if self.admit is not None:
                answer = self.admit(event)
                if not answer:
                    reason = getattr(answer, "reason", "") or "the privacy filter refused it"
                    raise BudgetExceededError(f"stage {self.stage!r} step {step} not taken: {reason}")
            assert self.event_sink is not None
            self.event_sink(event)  # write-ahead: durable before anything is released
        return event

    def _private_release(
        self, batch: UserBatch, loss_fn: LossFn, step: int, release: int, plan: StepPlan
    ) -> tuple[list[Tensor], ReleasedStep]:
        _, per_user = self.per_user_gradients(batch, loss_fn)
        with full_precision(self._device):  # norms, clip factors, sums and noise in fp32 under any autocast
            return self._clip_and_noise(per_user, step, release, plan)

    def _clip_and_noise(
        self, per_user: list[PerUserGrad], step: int, release: int, plan: StepPlan
    ) -> tuple[list[Tensor], ReleasedStep]:
        sums, counts, _ = self.clip_and_sum(per_user, plan.clip_norms)
        centred = self.centred_counts(counts, per_user[0].shape[0])  # [K]
        if self.reduce_fn is not None:
            self.reduce_fn([*sums, centred])  # clipped sums of all ranks, before noise (noise counts once)
        gen = release_generator(self.seed, step, kind="noise", release=release)
        for i, s in enumerate(sums):
            std = plan.noise_stds[self.group_of_param[i]]
            noise = gen.normal(s.shape)  # drawn for every tensor, so streams never shift
            if std > 0:
                s += (std * noise).to(s.device)
        noisy_counts = None
        if plan.count_noise_std is not None:
            # Centred: each user adds b - 1/2 in {-1/2, +1/2}, so the release has sensitivity 1/2 per group (the raw
            # count would move by 1 and cost 4x the privacy). B/2 is public: adding it back is post-processing.
            cgen = release_generator(self.seed, step, kind="count", release=release)
            noise = plan.count_noise_std * cgen.normal((len(self.groups),), dtype=torch.float64)  # [K]
            noisy = centred.cpu().double() + noise + self.count_offset()
            noisy_counts = tuple(float(c) for c in noisy)
        b = self.expected_batch_size
        grads = [s / b for s in sums]
        group_grads = tuple(tuple(grads[i] for i in members) for members in self.group_members)
        released = ReleasedStep(
            step=step,
            release=release,
            plan=plan,
            groups=self.groups,
            noisy_grads=group_grads,
            noisy_grad_norms=tuple(
                float(torch.sqrt(sum(g.double().pow(2).sum() for g in gs))) for gs in group_grads
            ),
            noisy_unclipped_counts=noisy_counts,
            expected_batch_size=b,
        )
        return grads, released

    # ------------------------------------------------------------------------------------------------------------

    def _remember(self, grads: list[Tensor]) -> None:
        if self._check_move and self._snapshot is None and any(bool(g.abs().sum() > 0) for g in grads):
            self._snapshot = [p.detach().clone() for _, p in self.params]

    def _check_moved(self) -> None:
        """After the first non-zero update was applied, at least one trainable tensor must have changed."""
        if self._snapshot is None:
            return
        moved = any(not torch.equal(s, p.detach()) for s, (_, p) in zip(self._snapshot, self.params, strict=True))
        self._snapshot = None
        self._check_move = False
        if not moved:
            raise FrozenAdapterError(
                "the trainable weights did not change after the first DP update was applied: the optimizer does not "
                "hold them (built before add_lora or before model.to(device)?) or its learning rate is 0. Add the "
                "adapters after placing the model on its device, then build the optimizer, then the engine"
            )

"""Rollout generation and reward scoring as Ray actors; only LoRA weights travel from the learner to them.

* :class:`RolloutPolicy` holds a Hugging Face causal LM with a peft LoRA adapter (the policy) and generates
  left-padded, seeded rollouts. It is a plain class: Ray runs it as an actor, and tests or a single-process run
  call it directly, so the two paths share one implementation.
* Rewards are not scored here: each learner rank scores its own shard with its copy of the private reward model
  (``trainers.stages.ppo``), which is post-processing of a DP model and needs no accounting.
* :class:`ActorGroup` starts N actors of one class, slices the work BEFORE ``ray.put`` so each actor receives
  only its chunk (OpenRLHF), and gathers results in input order. :class:`RolloutGroup` adds seeded generation
  and the LoRA sync: the learner's LoRA tensors are ``ray.put`` ONCE and every actor receives the same reference.

Determinism: prompts are processed in micro-batches of ``batch_size``; micro-batch i (counted over the whole
prompt list) samples under ``torch.manual_seed(seed + i)`` in a forked RNG. The group distributes whole
micro-batches, so the result depends on (prompts, seed, batch_size) and not on the number of actors.

Ray is imported inside functions only: importing this module starts nothing.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dpalign.rollout")


@dataclass(frozen=True)
class Rollout:
    """One generated response.

    Attributes:
        prompt_ids: [P_i] the prompt's token ids as the model saw them (BOS + prompt), without padding.
        response_ids: [T_i] generated token ids up to and including the first EOS (or ``max_new_tokens`` ids
            when no EOS came), without padding. T_i >= 1.
        text: the response decoded with special tokens removed.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    text: str


@dataclass(frozen=True)
class SyncStats:
    """Cost of one LoRA weight sync.

    Attributes:
        bytes: payload size (sum of tensor bytes) of the LoRA state.
        seconds: wall time; on the learner side, from ``ray.put`` until every actor has loaded the weights.
        tensors: number of tensors synced.
    """

    bytes: int
    seconds: float
    tensors: int


def lora_state_dict(model: Any) -> dict[str, Any]:
    """The LoRA tensors of a peft model, detached CPU copies keyed by parameter name (the sync payload).

    Only ``lora_`` parameters travel: the frozen base weights are already on every actor.
    """
    state = {n: p.detach().to("cpu").clone() for n, p in model.named_parameters() if "lora_" in n}
    if not state:
        raise ValueError(f"{type(model).__name__} has no LoRA parameters to sync; add the adapter first")
    return state


def _canonical(name: str) -> str:
    """Parameter name relative to the wrapped transformer, so a learner wrapper (e.g. a value head) still maps."""
    marker = "base_model.model."
    return name[name.rfind(marker) + len(marker) :] if marker in name else name


@dataclass(frozen=True)
class _LoraSpec:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


def _lora_spec(lora: Any) -> _LoraSpec:
    get = (lambda k: lora[k]) if isinstance(lora, Mapping) else (lambda k: getattr(lora, k))
    return _LoraSpec(int(get("r")), float(get("alpha")), float(get("dropout")), tuple(get("target_modules")))


def generate_rollouts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    batch_size: int,
    first_batch: int = 0,
) -> list[Rollout]:
    """Sample a response for each prompt; micro-batch j of this call uses ``seed + first_batch + j``.

    Prompts are encoded as ``BOS + prompt`` (the context of pretraining), or through the tokenizer's chat template
    (``trainers.data.chat.prompt_text``), and LEFT-padded so every row's last prompt token sits at the last column
    and generation continues right after it. ``model.generate`` keeps the KV cache (each new token costs one
    position, not the whole prefix) and runs under bf16 autocast on CUDA (``trainers.precision``).
    ``temperature == 0`` decodes greedily. The caller's global RNG is untouched (forked).
    """
    import torch

    from trainers.models.tokenizer import padding_side
    from trainers.precision import autocast

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0: greedy)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    from trainers.data.chat import prompt_text

    eos_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=top_k or None, top_p=1.0)
    was_training = model.training
    model.eval()
    out: list[Rollout] = []
    try:
        for j, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
            with padding_side(tokenizer, "left"):
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad(), torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]), \
                    autocast(device):  # bf16 on CUDA (trainers.precision); nothing on CPU
                torch.manual_seed(seed + first_batch + j)
                ids = model.generate(
                    **enc, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_id, **kwargs
                )  # [b, P + T]
            P = enc["input_ids"].shape[1]
            for row in range(ids.shape[0]):
                prompt = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()  # [P_i]
                response = ids[row, P:].tolist()  # [T]: generated, padded after EOS
                if eos_id in response:
                    response = response[: response.index(eos_id) + 1]
                text = tokenizer.decode(response, skip_special_tokens=True)
                out.append(Rollout(prompt_ids=prompt, response_ids=response, text=text))
    finally:
        model.train(was_training)
    return out


class RolloutPolicy:
    """The policy (base model + LoRA adapter) that generates rollouts; run it as a Ray actor or in process.

    Args:
        base_model_dir: a directory saved with ``save_pretrained`` holding the model and its tokenizer (the SFT
            model merged, or the base model).
        lora: the policy adapter's shape (``trainers.stages.config.LoraConfig`` or a mapping with r, alpha,
            dropout, target_modules); its weights arrive with :meth:`load_lora_state`.
        threads: torch intra-op threads while this policy generates (1 per actor keeps N actors from
            oversubscribing cores); set around each call and restored, so a policy used in-process leaves the
            caller's thread count alone.
    """

    def __init__(self, base_model_dir: str | os.PathLike[str], *, lora: Any, threads: int = 1) -> None:
        from transformers import AutoModelForCausalLM

        from dpalign.allocator import keep_freed_memory
        from trainers.models.lora import add_lora
        from trainers.models.tokenizer import load_tokenizer

        keep_freed_memory()  # an actor on a cluster node did not inherit the driver's setting
        self.threads = int(threads)
        spec = _lora_spec(lora)
        self.tokenizer = load_tokenizer(base_model_dir)
        base = AutoModelForCausalLM.from_pretrained(str(base_model_dir))
        self.model = add_lora(
            base, r=spec.r, alpha=spec.alpha, dropout=spec.dropout, target_modules=spec.target_modules
        )
        self.model.eval()
        self.model.requires_grad_(False)  # inference only: the learner owns the trainable copy
        self._lora = {
            _canonical(n): p for n, p in self.model.named_parameters() if "lora_" in n
        }  # name -> live parameter

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        batch_size: int = 16,
        first_batch: int = 0,
    ) -> list[Rollout]:
        """Rollouts for ``prompts`` (see :func:`generate_rollouts`), on ``threads`` torch threads."""
        import torch

        before = torch.get_num_threads()
        if self.threads >= 1:
            torch.set_num_threads(self.threads)
        try:
            return generate_rollouts(
                self.model,
                self.tokenizer,
                list(prompts),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                seed=seed,
                batch_size=batch_size,
                first_batch=first_batch,
            )
        finally:
            torch.set_num_threads(before)

    def load_lora_state(self, state: Mapping[str, Any]) -> SyncStats:
        """Copy the learner's LoRA tensors into the adapter in place.

        Keys may carry a learner-side prefix (anything up to ``base_model.model.``); the set of LoRA tensors must
        match exactly, so a sync cannot silently update only part of the adapter.

        Raises:
            ValueError: missing or unexpected keys, or a shape mismatch.
        """
        import torch

        start = time.perf_counter()
        incoming = {_canonical(k): v for k, v in state.items()}
        missing = sorted(set(self._lora) - set(incoming))
        extra = sorted(set(incoming) - set(self._lora))
        if missing or extra:
            raise ValueError(
                f"LoRA sync: {len(missing)} adapter tensors missing (e.g. {missing[:1]}), {len(extra)} unexpected "
                f"(e.g. {extra[:1]}); the learner and the rollout actors must use the same LoRA config"
            )
        nbytes = 0
        with torch.no_grad():
            for name, param in self._lora.items():
                value = torch.as_tensor(incoming[name])
                if value.shape != param.shape:
                    raise ValueError(f"LoRA sync: {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                param.copy_(value.to(param.device, param.dtype))
                nbytes += value.numel() * value.element_size()
        return SyncStats(bytes=nbytes, seconds=time.perf_counter() - start, tensors=len(self._lora))

    def lora_state(self) -> dict[str, Any]:
        """The adapter's current LoRA tensors (CPU copies)."""
        return lora_state_dict(self.model)


def split_aligned(n_items: int, n_parts: int, align: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` slices of ``n_items`` over at most ``n_parts`` parts, starts multiples of align.

    Whole units of ``align`` items are spread as evenly as possible; empty parts are dropped.
    """
    if n_parts < 1 or align < 1:
        raise ValueError(f"n_parts={n_parts} and align={align} must be >= 1")
    units = math.ceil(n_items / align)
    per, rest = divmod(units, n_parts)
    out, unit = [], 0
    for part in range(n_parts):
        take = per + (1 if part < rest else 0)
        if take == 0:
            continue
        start, stop = unit * align, min((unit + take) * align, n_items)
        out.append((start, stop))
        unit += take
    return out


class ActorGroup:
    """N Ray actors of one class; fan work out in chunks, gather in order.

    Args:
        cls: the actor class (a plain class; wrapped with ``ray.remote`` here).
        num_actors: N.
        num_cpus: CPUs reserved per actor.
        *args, **kwargs: constructor arguments, identical for every actor.
    """

    def __init__(self, cls: type, num_actors: int, *args: Any, num_cpus: float = 1, **kwargs: Any) -> None:
        import ray

        if num_actors < 1:
            raise ValueError(f"num_actors={num_actors}: must be >= 1")
        remote_cls = ray.remote(num_cpus=num_cpus)(cls)
        self.actors = [remote_cls.remote(*args, **kwargs) for _ in range(num_actors)]

    def __len__(self) -> int:
        return len(self.actors)

    def fan_out(
        self,
        method: str,
        items: Sequence[Any],
        *,
        align: int = 1,
        offset_kw: str | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``method(chunk, **kwargs)`` on each actor with its own contiguous chunk; concatenate in order.

        Each chunk is put in the object store separately, so an actor fetches only its own items.

        Args:
            align: chunk starts are multiples of ``align`` (whole micro-batches).
            offset_kw: if given, each call also gets ``offset_kw=start // align`` (its first unit's index).
        """
        import ray

        items = list(items)
        calls = []
        for actor, (start, stop) in zip(self.actors, split_aligned(len(items), len(self.actors), align), strict=False):
            ref = ray.put(items[start:stop])
            extra = {offset_kw: start // align} if offset_kw else {}
            calls.append(getattr(actor, method).remote(ref, **kwargs, **extra))
        out: list[Any] = []
        for part in ray.get(calls):
            out.extend(part)
        return out

    def broadcast(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method`` on every actor with the same arguments (pass ObjectRefs to share one copy)."""
        import ray

        return ray.get([getattr(actor, method).remote(*args, **kwargs) for actor in self.actors])

    def shutdown(self) -> None:
        """Kill the actors (their resources return to the cluster)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class RolloutGroup:
    """N :class:`RolloutPolicy` actors: seeded generation independent of N, and the LoRA-only weight sync."""

    def __init__(
        self, base_model_dir: str | os.PathLike[str], *, lora: Any, num_actors: int, threads: int = 1
    ) -> None:
        self.group = ActorGroup(
            RolloutPolicy, num_actors, str(base_model_dir), lora=lora, threads=threads, num_cpus=threads
        )

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        batch_size: int = 16,
    ) -> list[Rollout]:
        """Rollouts for ``prompts`` in order, equal to ``RolloutPolicy.generate`` on one process."""
        return self.group.fan_out(
            "generate",
            prompts,
            align=batch_size,
            offset_kw="first_batch",
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            batch_size=batch_size,
        )

    def sync_lora(self, state: Mapping[str, Any]) -> SyncStats:
        """Send the learner's LoRA tensors to every actor through ONE object-store copy; log bytes and seconds."""
        import ray

        start = time.perf_counter()
        ref = ray.put(dict(state))
        stats = self.group.broadcast("load_lora_state", ref)
        seconds = time.perf_counter() - start
        result = SyncStats(bytes=stats[0].bytes, seconds=seconds, tensors=stats[0].tensors)
        log.info(
            "LoRA sync: %d tensors, %d bytes to %d actors in %.3f s",
            result.tensors,
            result.bytes,
            len(self.group),
            seconds,
        )
        return result

    def shutdown(self) -> None:
        self.group.shutdown()


def generate_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 32,
) -> list[str]:
    """Sample a continuation of each prompt (text after the prompt, special tokens removed).

    Prompts are encoded as ``<|endoftext|> prompt`` (the context every document had in pretraining) and
    left-padded, so each row's last real token sits at the last position and generation continues right after
    it. ``temperature == 0`` decodes greedily. Sampling is deterministic for a given (seed, batch_size, prompts):
    batch i uses ``torch.manual_seed(seed + i)`` inside a forked RNG, so the caller's global RNG is untouched.
    Generation stops at ``<|endoftext|>`` or after ``max_new_tokens``.

    Args:
        max_new_tokens: most tokens generated per prompt.
        temperature: softmax temperature of sampling; 0 decodes greedily.
        top_k: sample among the k most likely tokens; 0 samples from the whole vocabulary.
        seed: seeds the sampling (batch i uses seed + i).
        batch_size: prompts per ``generate`` call.
    """
    rollouts = generate_rollouts(
        model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        seed=seed, batch_size=batch_size,
    )
    return [r.text for r in rollouts]

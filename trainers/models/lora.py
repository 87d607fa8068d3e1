"""LoRA adapters (peft) for the private stages: creation, clipping groups, sanity checks, merge/export, loading.

GPT-2 note: its attention projection ``c_attn`` is a fused q/k/v ``Conv1D`` whose weight is stored [in, out]
(transposed relative to ``nn.Linear``). peft handles it with ``fan_in_fan_out=True``, which :func:`add_lora`
sets whenever a target module is a Conv1D. Adapting ``c_attn`` adapts query, key and value together (Wu et al.
adapt query and value; with the fused projection that choice is not available without splitting the module).

Clipping groups: the DP engine clips each LoRA module's update (A and B together) to its own threshold C_k, so
:func:`lora_groups` returns one group per adapted module, in the model's module order (stable across runs and
across processes, so group k means the same module everywhere).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def add_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("c_attn",),
    adapter_name: str = "default",
) -> Any:
    """Wrap ``model`` in a peft ``PeftModel`` with a fresh LoRA adapter; only adapter weights are trainable.

    Create the adapter *after* moving the base model to its device and *before* building the optimizer (and
    the DP engine): an optimizer built earlier holds no adapter parameters and trains nothing, silently.
    :func:`assert_trainable_lora` (with the optimizer) catches that.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is ``alpha / r * B @ A``).
        dropout: dropout on the adapter input; keep 0 for DP stages (deterministic per-user gradients).
        target_modules: module-name suffixes to adapt; GPT-2 default ``("c_attn",)``.
        adapter_name: peft adapter name (several adapters can live on one model, e.g. policy and reward).
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if r < 1:
        raise ValueError(f"LoRA r={r}: must be >= 1")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha={alpha}: must be > 0")
    targets = [
        module
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in target_modules)
    ]
    if not targets:
        raise ValueError(
            f"LoRA target_modules={list(target_modules)}: no module of {type(model).__name__} matches; "
            "for GPT-2 use c_attn (and/or c_proj, c_fc)"
        )
    conv = [isinstance(m, Conv1D) for m in targets]
    if any(conv) and not all(conv):
        raise ValueError(
            f"LoRA target_modules={list(target_modules)}: mixes Conv1D and Linear modules; peft's fan_in_fan_out "
            "is one flag per adapter, so adapt them with separate adapters"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        fan_in_fan_out=all(conv),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def _lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _clean_name(name: str) -> str:
    """Module name relative to the base model (``transformer.h.0.attn.c_attn``), without peft's wrappers."""
    for prefix in ("base_model.model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def lora_groups(model: nn.Module, adapter_name: str | None = None) -> dict[str, list[nn.Parameter]]:
    """One clipping group per adapted module: ``{module_name: [A.weight, B.weight]}`` in module order.

    Args:
        adapter_name: which adapter (default: the model's active adapter).

    Raises:
        ValueError: the model has no LoRA layer for that adapter.
    """
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        adapter_name = active if isinstance(active, str) else (active[0] if active else "default")
    groups: dict[str, list[nn.Parameter]] = {}
    for name, layer in _lora_layers(model):
        if adapter_name in layer.lora_A:
            groups[_clean_name(name)] = [layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight]
    if not groups:
        raise ValueError(
            f"no LoRA layer with adapter {adapter_name!r} in {type(model).__name__}; call add_lora first"
        )
    return groups


def assert_trainable_lora(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Fail loudly unless LoRA parameters exist, require grad, sit on the base model's device and are optimized.

    Catches the silent no-op trainings: adapters loaded without ``is_trainable=True`` or frozen by a later
    ``requires_grad_(False)``; adapters created on another device than the model; an optimizer (or DP engine)
    built before the adapters were added, which then steps parameters that no longer receive gradients.
    """
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    if not lora:
        raise AssertionError(
            f"{type(model).__name__} has no LoRA parameters; call add_lora(model, ...) first"
        )
    trainable = [(n, p) for n, p in lora if p.requires_grad]
    if not trainable:
        raise AssertionError(
            f"none of the {len(lora)} LoRA parameters requires grad (e.g. {lora[0][0]}): the adapter is frozen. "
            "Load adapters with PeftModel.from_pretrained(..., is_trainable=True) and do not call "
            "requires_grad_(False) after add_lora"
        )
    base_device = next(p.device for n, p in model.named_parameters() if "lora_" not in n)
    misplaced = [n for n, p in lora if p.device != base_device]
    if misplaced:
        raise AssertionError(
            f"LoRA parameter {misplaced[0]} is on another device than the base model ({base_device}); "
            "move the model with model.to(device) after add_lora, before building the optimizer"
        )
    if optimizer is not None:
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in trainable if id(p) not in optimized]
        if missing:
            raise AssertionError(
                f"{len(missing)} trainable LoRA parameters (e.g. {missing[0]}) are not in the optimizer; "
                "build the optimizer after add_lora and after moving the model to its device"
            )


def merge_and_save(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Export the adapted model as a plain Hugging Face model (adapters merged), loadable with from_pretrained.

    The caller's model keeps its adapters: the merge happens on a copy.
    """
    out = Path(out_dir)
    merged = copy.deepcopy(model).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_lora(
    base: str | os.PathLike | nn.Module,
    adapter_dir: str | os.PathLike,
    *,
    trainable: bool = False,
    adapter_name: str = "default",
) -> Any:
    """A base model (directory, hub id or loaded module) with the LoRA adapter saved in ``adapter_dir``.

    ``trainable=False`` gives a frozen adapter for inference (reference policy, reward scoring); pass True to
    continue training it (peft otherwise loads adapters frozen, the silent failure assert_trainable_lora catches).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir}: no adapter_config.json; save adapters with model.save_pretrained"
        )
    if not isinstance(base, nn.Module):
        base = AutoModelForCausalLM.from_pretrained(str(base))
    model = PeftModel.from_pretrained(
        base, str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable
    )
    if not trainable:
        model.eval()
    return model

"""Exact per-user gradients of the trainable tensors from captured activations and output gradients.

Method (why this and not a whole-model Opacus ``GradSampleModule``): only the modules that OWN trainable
parameters (LoRA A/B ``nn.Linear``, trainable heads) get a forward hook. It keeps the module's input x (already
alive in the autograd graph, so no extra memory) and registers a tensor hook on its output; during the ordinary
``loss.sum().backward()`` that hook receives g = dL/d(output) and computes the per-record gradient right there,

    Linear:  dW_r = sum_t g_{r,t} x_{r,t}^T   (einsum "n...o,n...i->noi"),   db_r = sum_t g_{r,t}
    Conv1D (HF, weight [in, out]):  dW_r = sum_t x_{r,t} g_{r,t}^T

then adds it to its user's row of a per-user buffer (``index_add_``) and drops g. Nothing is materialized for
the frozen base model, and g of one layer is freed before the next layer's arrives. For other module types
with trainable parameters (Embedding, LayerNorm, GroupNorm, ...) Opacus's per-layer grad samplers are used.

Row -> record -> user: a forward call of a hooked module must have exactly R rows (R records in the micro-batch),
row j being record j. A loss that stacks m copies of the records into one call (``torch.cat([chosen, rejected])``,
2R rows, row j belonging to record j % R) must say so with ``with stacked_copies(2):`` around that call; any other
row count is an error, never a guess: a module that flattens tokens into rows ([R*T, d]) would otherwise have its
rows silently attributed to the wrong records (and users). Per-user buffers
persist across the micro-batches of a release: a user's records may be split over several physical
micro-batches and are still summed before clipping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# Modules whose output mixes the examples of a batch: a per-record loss through them is not per record.
_CROSS_EXAMPLE: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


_STACKED = threading.local()


@contextmanager
def stacked_copies(m: int) -> Iterator[None]:
    """Declare that the forward calls inside run on ``m`` stacked copies of the micro-batch's records (m*R rows,
    row j belonging to record j % R), e.g. chosen and rejected sequences in one call: ``with stacked_copies(2):``."""
    if m < 1:
        raise ValueError(f"stacked_copies({m}): m must be >= 1")
    previous = getattr(_STACKED, "m", 1)
    _STACKED.m = int(m)
    try:
        yield
    finally:
        _STACKED.m = previous


class CrossExampleModuleError(ValueError):
    """The model contains a module that couples the examples of a batch (batch norm): per-user clipping is void."""


def check_no_cross_example_modules(model: nn.Module) -> None:
    """Refuse models whose forward mixes records (docs/design.md section 2, "What breaks the contract")."""
    for name, module in model.named_modules():
        if isinstance(module, _CROSS_EXAMPLE):
            raise CrossExampleModuleError(
                f"module {name or '<root>'} ({type(module).__name__}) normalizes with statistics of the whole "
                "batch, so one user's records change every other user's gradient and clipping no longer bounds "
                "a user's influence; replace it with LayerNorm or GroupNorm (per example)"
            )
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):  # HF's per-module flag
        raise ValueError(
            "gradient checkpointing is on: recomputed forwards would be captured twice; disable it "
            "(model.gradient_checkpointing_disable()) for DP steps"
        )


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _opacus_sampler(module: nn.Module) -> Callable[..., dict[nn.Parameter, Tensor]] | None:
    from opacus.grad_sample import GradSampleModule

    return GradSampleModule.GRAD_SAMPLERS.get(type(module))


def per_record_grads(module: nn.Module, x: Tensor, g: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-row gradients {param: [n, *param.shape]} of ``module``'s trainable parameters for one forward call.

    Args:
        x: the call's input, [n, ..., in].
        g: dL/d(output), [n, ..., out].
    """
    out: dict[nn.Parameter, Tensor] = {}
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        x = x.to(g.dtype)
        weight, bias = module.weight, getattr(module, "bias", None)
        if weight.requires_grad:
            if isinstance(module, nn.Linear):  # weight [out, in]
                out[weight] = torch.einsum("n...o,n...i->noi", g, x)  # [n, out, in]
            else:  # HF Conv1D, weight [in, out]
                out[weight] = torch.einsum("n...i,n...o->nio", x, g)  # [n, in, out]
        if bias is not None and bias.requires_grad:
            out[bias] = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)  # [n, out]
        return out
    sampler = _opacus_sampler(module)
    if sampler is None:  # unreachable after PerUserGradCollector's constructor check
        raise TypeError(f"no per-record grad sampler for {type(module).__name__}")
    return sampler(module, [x], g)


class PerUserGradCollector:
    """Hooks on the modules owning ``params``; accumulates per-user gradients while ``capturing()`` is active.

    Usage per release: ``begin(num_users)``, then per micro-batch ``with capturing(row_users): loss.sum().backward()``,
    then read ``buffers`` ([U, *shape] float32 per parameter, in ``params`` order).
    """

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
        owner: dict[int, tuple[str, nn.Module]] = {}
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    owner[id(p)] = (f"{mname}.{pname}" if mname else pname, module)
        self._modules: dict[int, nn.Module] = {}
        for name, p in params:
            if id(p) not in owner:
                raise ValueError(f"trainable parameter {name} is not owned by any module of the model")
            _, module = owner[id(p)]
            supported = isinstance(module, nn.Linear) or _is_hf_conv1d(module) or _opacus_sampler(module)
            if not supported:
                raise TypeError(
                    f"trainable parameter {name} belongs to a {type(module).__name__}, which has no per-record "
                    "gradient rule (supported: nn.Linear, transformers Conv1D, and Opacus's grad samplers: "
                    "Embedding, LayerNorm, GroupNorm, Conv*, RMSNorm); freeze it or adapt it with LoRA"
                )
            self._modules[id(module)] = module
        self._index = {id(p): i for i, (_, p) in enumerate(params)}
        self._params = [p for _, p in params]
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self._modules.values()]
        self._row_users: Tensor | None = None
        self.buffers: list[Tensor] = []
        self.outputs: list[Tensor] = []  # hooked module outputs of the current capture (backward targets)

    def close(self) -> None:
        """Remove the hooks (the model then trains as if the engine never existed)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def begin(self, num_users: int) -> None:
        """Zero per-user buffers for a release with ``num_users`` users: [U, *shape] float32 per parameter."""
        self.buffers = [
            torch.zeros((num_users, *p.shape), dtype=torch.float32, device=p.device) for p in self._params
        ]

    @contextmanager
    def capturing(self, row_users: Tensor) -> Iterator[None]:
        """Capture the forward/backward inside; ``row_users`` [R] int64 is the user slot of each record."""
        self._row_users = row_users
        self.outputs = []
        try:
            yield
        finally:
            self._row_users = None

    def _forward_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        users = self._row_users
        if users is None or not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            return
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"{type(module).__name__}: expected its input as the first positional argument")
        x = args[0].detach()  # [n, ..., in]; alive in the graph anyway
        n, r, m = x.shape[0], users.numel(), getattr(_STACKED, "m", 1)
        if n != m * r:
            raise ValueError(
                f"{type(module).__name__} was called on a batch of {n} rows in a micro-batch of {r} records"
                + (f" inside stacked_copies({m})" if m > 1 else "")
                + ": its rows cannot be attributed to records (and users). Every forward call of a trainable module "
                "must have one row per record; a loss that stacks m copies of the records in one call (e.g. "
                "torch.cat([chosen, rejected])) must wrap it in trainers.engine.per_user.stacked_copies(m); a module "
                "that flattens tokens into rows is not supported"
            )
        rows = users.repeat(m) if m > 1 else users  # [n]: user slot of each row (row j is record j % R)

        def on_grad(g: Tensor) -> None:
            for p, gs in per_record_grads(module, x, g.detach()).items():
                i = self._index.get(id(p))
                if i is not None:
                    self.buffers[i].index_add_(0, rows, gs.to(torch.float32))  # [U, *shape] += per user

        output.register_hook(on_grad)
        self.outputs.append(output)

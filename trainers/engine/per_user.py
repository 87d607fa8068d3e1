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

Ghost norms (book-keeping, Bu et al. 2023 "fastDP"; Li et al. 2022): a Linear weight's per-user gradient is
G_u = sum_{(r,t) of u} g_{r,t} x_{r,t}^T, a sum over every token of every record of user u, so

    ||G_u||_F^2 = sum_{(r,t),(s,t')} (x_{r,t} . x_{s,t'}) (g_{r,t} . g_{s,t'})      (all pairs of u's tokens)

-- the Gram matrices of the user's L_u = (records of u) x T token inputs and output gradients, never the
[out, in] gradient. The module then keeps (x, g) of the release (``GhostGrad``) and, once the clip factors c_u
are known, materialises only the clipped sum sum_u c_u G_u = (c_row g)^T x as one matmul. It costs
sum_u L_u^2 (in + out) against (records x T) in out for materialising per-record gradients, so ``mode="auto"``
picks per module whichever is cheaper (fastDP's T^2 vs in*out rule, with L_u in place of T because a user
has several records). For LoRA the materialised path nearly always wins (A is r x in, B is out x r: a per-user
gradient is tiny next to L_u^2), so ghost norms pay for full-rank trainable Linear layers with short users.
Biases (and modules without a ghost rule) are always materialised, which costs U x out at most.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from trainers.precision import full_precision

# Modules whose output mixes the examples of a batch: a per-record loss through them is not per record.
_CROSS_EXAMPLE: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


_STACKED = threading.local()

PerUserMode = Literal["auto", "materialize", "ghost"]
PER_USER_MODES: tuple[str, ...] = ("auto", "materialize", "ghost")


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


def per_record_grads(
    module: nn.Module, x: Tensor, g: Tensor, *, skip_weight: bool = False
) -> dict[nn.Parameter, Tensor]:
    """Per-row gradients {param: [n, *param.shape]} of ``module``'s trainable parameters for one forward call.

    Args:
        x: the call's input, [n, ..., in].
        g: dL/d(output), [n, ..., out].
        skip_weight: leave out a Linear/Conv1D weight (it goes by ghost norms).
    """
    out: dict[nn.Parameter, Tensor] = {}
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        x = x.to(g.dtype)
        weight, bias = module.weight, getattr(module, "bias", None)
        if weight.requires_grad and not skip_weight:
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


@dataclass
class GhostGrad:
    """The per-user gradients [U, *weight.shape] of one Linear/Conv1D weight, kept as its factors (x, g) per forward
    call (book-keeping): squared norms by the Gram trick, the clipped sum as one matmul, never [U, out, in].

    PRIVATE like the materialised per-user gradients: never log or release anything from it unclipped.
    """

    weight: nn.Parameter
    num_users: int
    conv1d: bool  # HF Conv1D: weight [in, out]; nn.Linear: weight [out, in]
    entries: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (x [n,...,in], g [n,...,out], rows [n])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_users, *self.weight.shape))

    def _tokens(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every (record, token) pair of the release: inputs [N, in], output grads [N, out] (float32), owner [N]."""
        xs, gs, owner = [], [], []
        for x, g, rows in self.entries:
            per_row = x[0].numel() // x.shape[-1]  # tokens per row
            xs.append(x.reshape(-1, x.shape[-1]).float())
            gs.append(g.reshape(-1, g.shape[-1]).float())
            owner.append(rows.repeat_interleave(per_row))
        return torch.cat(xs), torch.cat(gs), torch.cat(owner)

    def sq_norms(self) -> Tensor:
        """[U] float32: ||G_u||_F^2 = sum over pairs of u's tokens of (x.x')(g.g'), one padded Gram per user."""
        if not self.entries:
            return torch.zeros(self.num_users, dtype=torch.float32, device=self.weight.device)
        x, g, owner = self._tokens()
        order = torch.argsort(owner, stable=True)
        owner = owner[order]
        counts = torch.bincount(owner, minlength=self.num_users)  # [U] tokens per user
        starts = torch.cumsum(counts, 0) - counts  # [U]
        pos = torch.arange(owner.numel(), device=owner.device) - starts[owner]  # position within its user
        width = int(counts.max())
        xp = x.new_zeros(self.num_users, width, x.shape[1])  # [U, L, in], zero padding adds nothing
        gp = g.new_zeros(self.num_users, width, g.shape[1])  # [U, L, out]
        xp[owner, pos] = x[order]
        gp[owner, pos] = g[order]
        return (torch.bmm(xp, xp.transpose(1, 2)) * torch.bmm(gp, gp.transpose(1, 2))).sum((1, 2))  # [U]

    def weighted_sum(self, scales: Tensor) -> Tensor:
        """sum_u scales[u] G_u [*weight.shape] float32: each row's output gradient scaled by its user's factor."""
        total = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        for x, g, rows in self.entries:
            w = scales.to(g.device, torch.float32)[rows].reshape(-1, *([1] * (g.dim() - 1)))  # [n, 1, ...]
            gw = (g.float() * w).reshape(-1, g.shape[-1])  # [N, out]
            xf = x.reshape(-1, x.shape[-1]).float()  # [N, in]
            total += xf.T @ gw if self.conv1d else gw.T @ xf
        return total

    def materialize(self) -> Tensor:
        """[U, *weight.shape] float32 (tests and audits: the reference path's tensor)."""
        out = torch.zeros(self.shape, dtype=torch.float32, device=self.weight.device)
        eq = "n...i,n...o->nio" if self.conv1d else "n...o,n...i->noi"
        for x, g, rows in self.entries:
            out.index_add_(0, rows, torch.einsum(eq, *((x.float(), g.float()) if self.conv1d else (g.float(), x.float()))))
        return out


PerUserGrad = Tensor | GhostGrad


def sq_norms(grad: PerUserGrad) -> Tensor:
    """[U] squared Frobenius norm of each user's gradient of one tensor."""
    if isinstance(grad, GhostGrad):
        return grad.sq_norms()
    return grad.flatten(1).pow(2).sum(1)


def weighted_sum(grad: PerUserGrad, scales: Tensor) -> Tensor:
    """sum_u scales[u] * (user u's gradient), [*shape]: the only gradient-sized tensor the fast path builds."""
    if isinstance(grad, GhostGrad):
        return grad.weighted_sum(scales)
    return torch.tensordot(scales, grad, dims=1)


def as_tensor(grad: PerUserGrad) -> Tensor:
    """[U, *shape]: the materialised per-user gradient (tests, audits)."""
    return grad.materialize() if isinstance(grad, GhostGrad) else grad


def ghost_pays(*, user_tokens: Tensor, d_in: int, d_out: int) -> bool:
    """fastDP's book-keeping rule with users: ghost norms cost sum_u L_u^2 (in + out) multiply-adds, materialising
    per-record gradients (sum_u L_u) in out. ``user_tokens`` [U]: L_u, the (record, token) pairs of each user."""
    lengths = user_tokens.double()
    return float((lengths.pow(2).sum()) * (d_in + d_out)) < float(lengths.sum()) * d_in * d_out


class PerUserGradCollector:
    """Hooks on the modules owning ``params``; accumulates per-user gradients while ``capturing()`` is active.

    Usage per release: ``begin(num_users, user_records)``, then per micro-batch
    ``with capturing(row_users): loss.sum().backward()``, then ``grads()``: per parameter (in ``params`` order)
    either a [U, *shape] float32 tensor or a ``GhostGrad`` (see the module docstring), per ``mode``:
    ``materialize`` (every tensor materialised), ``ghost`` (every Linear/Conv1D weight by ghost norms) or ``auto``
    (per module, whichever ``ghost_pays``).
    """

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], mode: PerUserMode = "auto") -> None:
        if mode not in PER_USER_MODES:
            raise ValueError(f"per_user_mode={mode!r}: use one of {list(PER_USER_MODES)}")
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
        self.mode = mode
        self._index = {id(p): i for i, (_, p) in enumerate(params)}
        self._params = [p for _, p in params]
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self._modules.values()]
        self._row_users: Tensor | None = None
        self._user_records: Tensor | None = None
        self._ghost_of: dict[int, GhostGrad | None] = {}  # module id -> its weight's GhostGrad (None: materialised)
        self._buffers: list[PerUserGrad | None] = []
        self._num_users = 0
        self.outputs: list[Tensor] = []  # hooked module outputs of the current capture (backward targets)

    def close(self) -> None:
        """Remove the hooks (the model then trains as if the engine never existed)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def begin(self, num_users: int, user_records: Tensor | None = None) -> None:
        """Start a release with ``num_users`` users; ``user_records`` [U] (records of each user) feeds the ``auto``
        cost rule (default one each). Buffers are allocated on first use, ghost modules never get one."""
        self._num_users = int(num_users)
        self._user_records = user_records
        self._ghost_of = {}
        self._buffers = [None] * len(self._params)

    def grads(self) -> list[PerUserGrad]:
        """Per trainable tensor: [U, *shape] float32 or a ``GhostGrad`` (zeros for a tensor no forward reached)."""
        return [
            b if b is not None else torch.zeros((self._num_users, *p.shape), dtype=torch.float32, device=p.device)
            for b, p in zip(self._buffers, self._params, strict=True)
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

    def _ghost_for(self, module: nn.Module, x: Tensor, m: int) -> GhostGrad | None:
        """The module's GhostGrad for this release if its weight goes by ghost norms, else None (decided once)."""
        key = id(module)
        if key in self._ghost_of:
            return self._ghost_of[key]
        ghost = None
        weight = getattr(module, "weight", None)
        linear = isinstance(module, nn.Linear) or _is_hf_conv1d(module)
        if self.mode != "materialize" and linear and weight is not None and id(weight) in self._index:
            d_in = x.shape[-1]
            d_out = weight.numel() // d_in
            records = self._user_records
            if records is None:
                records = torch.ones(self._num_users, dtype=torch.int64)
            tokens = records.double() * m * (x[0].numel() // d_in)  # [U] L_u of this module
            if self.mode == "ghost" or ghost_pays(user_tokens=tokens, d_in=d_in, d_out=d_out):
                ghost = GhostGrad(weight=weight, num_users=self._num_users, conv1d=_is_hf_conv1d(module))
                self._buffers[self._index[id(weight)]] = ghost
        self._ghost_of[key] = ghost
        return ghost

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
        ghost = self._ghost_for(module, x, m)

        def on_grad(g: Tensor) -> None:
            with full_precision(g.device):  # per-user sums and norms in fp32 even under bf16 autocast
                self._on_grad(module, x.float() if x.is_floating_point() else x, g.detach().float(), rows, ghost)

        output.register_hook(on_grad)
        self.outputs.append(output)

    def _on_grad(self, module: nn.Module, x: Tensor, g: Tensor, rows: Tensor, ghost: GhostGrad | None) -> None:
        """Backward of one hooked call: x [n, ..., in] and g [n, ..., out] (fp32) -> per-user sums or ghost factors."""
        n = x.shape[0]
        if ghost is not None:
            ghost.entries.append((x, g, rows))  # book-keeping: the weight's norms and clipped sum come later
        grads = per_record_grads(module, x, g, skip_weight=ghost is not None)
        if not grads:
            return
        # rows -> users as a [U, n] 0/1 matmul: one GEMM, where index_add_ (a scatter) cost more than the
        # per-record gradients themselves on CPU
        onehot = torch.zeros(self._num_users, n, dtype=torch.float32, device=g.device)
        onehot[rows.to(g.device), torch.arange(n, device=g.device)] = 1.0
        for p, gs in grads.items():
            i = self._index.get(id(p))
            if i is not None:
                per_user = (onehot @ gs.reshape(n, -1).to(torch.float32)).view(self._num_users, *p.shape)
                buf = self._buffers[i]
                if buf is None:
                    self._buffers[i] = per_user  # [U, *shape]
                else:
                    assert isinstance(buf, Tensor)
                    buf += per_user  # [U, *shape]: the user's records of earlier micro-batches or calls

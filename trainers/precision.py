"""Mixed precision: bf16 autocast for the forwards of learners and rollouts on CUDA; privacy arithmetic in fp32.

Why bf16 autocast and not a bf16 model: the master weights, the optimizer state and every privacy quantity stay
fp32 -- per-user gradients and their norms (``trainers.engine.per_user`` casts the captured activations and output
gradients to fp32 before the per-user sums, Gram matrices and norms), the clip factors, the noise and the clip
counts (``trainers.engine.engine`` runs them under :func:`full_precision`). A bf16 norm (8 bits of mantissa) could
misjudge a user's norm by ~0.4% and the clip bound C would no longer hold exactly; the sensitivity the accountant
assumes must hold exactly. Only the matmuls of the forward (and hence of the backward) run in bf16.

On CPU (and on CUDA devices without bf16) :func:`autocast` does nothing: the same code path runs in fp32, which is
what the CPU tests exercise. The engine, ``trainers.rollout.generate_rollouts`` and the benchmarks use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """bf16 on a CUDA device that supports it, else None (fp32)."""
    if _device_type(device) == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@contextmanager
def autocast(device: torch.device | str, *, enabled: bool = True) -> Iterator[torch.dtype | None]:
    """bf16 autocast on CUDA (yields the dtype), nothing on CPU (yields None)."""
    dtype = autocast_dtype(device) if enabled else None
    ctx = torch.autocast(device_type="cuda", dtype=dtype) if dtype is not None else nullcontext()
    with ctx:
        yield dtype


@contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Autocast off for the privacy arithmetic (norms, clip factors, clipped sums, noise) inside an autocast region."""
    with torch.autocast(device_type=_device_type(device), enabled=False):
        yield

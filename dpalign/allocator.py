"""Keep freed memory in the process: glibc's malloc tuned so that training steps stop paying page faults.

Why: glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and
hands it back with ``munmap`` on free, and trims the top of the heap back to the OS. A training step on CPU
allocates and frees the same large activation and gradient tensors every step, so each one is faulted in page by
page, every step. Measured on the 2-core machine (medium GPT-2, LoRA on every linear layer, 32 records of 128
tokens; ``benchmarks/dp_overhead.py --malloc both``): the DP engine's step took 2.2 million minor page faults and
5.2 s of system time, the non-private step 0.8 million and 2.2 s; with freed memory kept, both are near zero and
both steps are faster (see the README's overhead table).

The setting is what PyTorch's CUDA caching allocator does for GPU memory: freed blocks stay with the process and
the next step reuses them. The resident set then stays at its high-water mark instead of shrinking between steps,
which is what a training process reaches every step anyway.

Opt out with ``DPALIGN_MALLOC=default`` (or by exporting glibc's own ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_``, which win). Elsewhere than glibc (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap and are reused after free
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: keep up to 2 GiB free at the top of the heap
ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
OPT_OUT = "DPALIGN_MALLOC"


def keep_freed_memory() -> bool:
    """Tune this process's glibc malloc to keep freed memory (see the module docstring), and export the same
    setting for the child processes it starts (an embedded Ray's workers, torchrun ranks), which read it at start.

    Called by every entry point that trains: the CLI, Ray Train workers, rollout actors, Tune trials. Safe to call
    again. Returns True when the setting is in effect in this process.
    """
    libc = _libc()
    if libc is None or os.environ.get(OPT_OUT, "").strip().lower() == "default":
        return False
    if any(k in os.environ for k in ENV):  # the user tuned glibc themselves (or a parent did it for us)
        return True
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if ok:
        for key, value in ENV.items():
            os.environ.setdefault(key, value)
    return ok


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another one (mallopt is glibc's)."""
    try:
        confstr = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    if not confstr or not confstr.startswith("glibc"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None

"""Poisson sampling of users and the deterministic (seed, step) random streams of a DP step.

Every random draw of the mechanism comes from a generator seeded by (run seed, step, stream), never from the
global RNG: every data-parallel rank then draws the SAME user sample and adds the SAME noise to the SAME globally
reduced sum, so the noise counts exactly once (N independent draws would average down to std/sqrt(N)), and a
resumed run redraws exactly what the crashed one drew.

Streams: ``"poisson"`` (which users are in step t), ``"noise"`` (the gradient noise of the first release of step
t), ``"noise/<k>"`` (release k >= 1 of the same sample, PPO epochs), ``"count"`` / ``"count/<k>"`` (the noise on
adaptive clipping's clip counts). The derivation is byte-for-byte that of ``trainers.distributed.step_seed`` and
``poisson_sample`` so that the distributed reference and the engine agree.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def step_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed for (run seed, step, stream), identical on every rank and in every process.

    A hash, not ``seed * K + step``: nearby (seed, step) pairs must not give overlapping or correlated streams.
    """
    if seed < 0 or step < 0:
        raise ValueError(f"seed={seed}, step={step}: both must be >= 0")
    digest = hashlib.blake2b(f"dpalign/{stream}/{seed}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def release_generator(seed: int, step: int, *, kind: str, release: int = 0) -> torch.Generator:
    """The CPU generator for the noise of one release: ``kind`` is "noise" (gradient) or "count" (clip counts).

    Release 0 uses stream ``kind`` (the same as the distributed reference), release k >= 1 of the same sample
    uses ``f"{kind}/{k}"``, so every PPO epoch gets fresh noise. Noise is drawn on the CPU and then moved to the
    tensor's device, so a GPU and a CPU worker draw identical noise.
    """
    if kind not in ("noise", "count"):
        raise ValueError(f"kind={kind!r}: must be 'noise' or 'count'")
    if release < 0:
        raise ValueError(f"release={release}: must be >= 0")
    stream = kind if release == 0 else f"{kind}/{release}"
    return torch.Generator().manual_seed(step_seed(seed, step, stream))


class PoissonUserSampler:
    """Each step, each of ``num_users`` users is included independently with probability ``sampling_rate``.

    This is the sampling the accountant assumes (``PoissonSampledDpEvent``); shuffled fixed-size batches are a
    different mechanism and must not be accounted as Poisson. The sample may be empty: an empty sample is a valid
    DP step (the release is noise only). Deterministic in (seed, step) and identical on every rank.
    """

    def __init__(self, num_users: int, *, sampling_rate: float, seed: int) -> None:
        if num_users < 1:
            raise ValueError(f"num_users={num_users}: must be >= 1")
        if not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"sampling_rate={sampling_rate}: must be in (0, 1]")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        self.num_users = int(num_users)
        self.sampling_rate = float(sampling_rate)
        self.seed = int(seed)

    @property
    def expected_batch_size(self) -> float:
        """The public normalizer B = q * N (never the realized sample size, which is private)."""
        return self.sampling_rate * self.num_users

    def sample(self, step: int) -> Tensor:
        """Sorted int64 indices of the users in step ``step``'s sample, shape [n_sampled] (possibly 0)."""
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, "poisson"))
        draws = torch.rand(self.num_users, generator=gen, dtype=torch.float64)  # [N]
        return torch.nonzero(draws < self.sampling_rate).flatten()  # [n_sampled]

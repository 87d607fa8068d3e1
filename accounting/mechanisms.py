"""Mechanism algebra: turning what the engine does into one effective noise multiplier.

Group-wise clipping: the per-user contribution is split into groups k (one LoRA module each), group k is clipped
to C_k and gets Gaussian noise with std s_k. Rescaling group k by 1/s_k turns the release into an isotropic
Gaussian with unit noise and sensitivity sqrt(sum_k C_k^2 / s_k^2), so the effective multiplier is

    sigma_eff = (sum_k C_k^2 / s_k^2) ** -0.5

Isotropic noise s_k = sigma * ||C||_2 gives sigma_eff = sigma; per-group noise s_k = sigma * C_k gives
sigma / sqrt(K), the silent sqrt(K) loss this helper exists to catch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def effective_noise_multiplier(*, clip_norms: Sequence[float], noise_stds: Sequence[float]) -> float:
    """sigma_eff = (sum_k C_k^2 / s_k^2)^(-1/2) for per-group thresholds C_k and noise stds s_k.

    Groups with C_k = 0 contribute nothing (they are never updated by private data).

    Raises:
        ValueError: on mismatched lengths, negative or non-finite values, a group with C_k > 0 and s_k <= 0
            (infinite privacy loss), or no group with C_k > 0.
    """
    if len(clip_norms) != len(noise_stds):
        raise ValueError(f"{len(clip_norms)} clip norms but {len(noise_stds)} noise stds")
    total = 0.0
    for k, (c, s) in enumerate(zip(clip_norms, noise_stds, strict=True)):
        c, s = float(c), float(s)
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"group {k}: clip norm must be finite and >= 0, got {c}")
        if not (s >= 0) or math.isnan(s):
            raise ValueError(f"group {k}: noise std must be >= 0, got {s}")
        if c == 0.0:
            continue
        if s == 0.0:
            raise ValueError(f"group {k}: clip norm {c} > 0 with noise std {s}: the release is not private")
        if math.isinf(s):
            continue
        total += (c / s) ** 2
    if total == 0.0:
        raise ValueError("no group has a positive clip norm with finite noise: nothing is released")
    return total**-0.5


def adaptive_clipping_multiplier(
    *, grad_noise_multiplier: float, count_noise_std: float, num_counts: int
) -> float:
    """Combined multiplier of a gradient release plus clip-count bits (Andrew et al. 2021).

    The noisy gradient sum has multiplier z_grad; each of ``num_counts`` clipped-fraction counts sums bits centred
    to +-1/2 (sensitivity 1/2) with noise std sigma_b. Together they are one Gaussian mechanism with

        z = (z_grad^-2 + K * (2 sigma_b)^-2)^(-1/2).

    Valid ONLY for the centred release sum_u (b_u - 1/2) + N(0, sigma_b^2), which is what
    ``trainers.engine.engine.DPEngine`` releases (it adds the public B/2 back afterwards). A RAW count
    sum_u b_u moves by 1 when one user is added, and K raw counts would cost z = (z_grad^-2 + K sigma_b^-2)^(-1/2).
    """
    if grad_noise_multiplier <= 0 or count_noise_std <= 0 or num_counts < 0:
        raise ValueError("grad_noise_multiplier and count_noise_std must be > 0, num_counts >= 0")
    return (grad_noise_multiplier**-2 + num_counts * (2.0 * count_noise_std) ** -2) ** -0.5


def grad_noise_for_target(*, target_multiplier: float, count_noise_std: float, num_counts: int) -> float:
    """Inverse of :func:`adaptive_clipping_multiplier`: the gradient multiplier z_grad that yields ``target``.

    Raises:
        ValueError: when the counts alone already exceed the budget, i.e. K (2 sigma_b)^-2 >= target^-2
            (Andrew et al.'s validity condition sigma_b >= sqrt(K) * z / 2 fails).
    """
    if target_multiplier <= 0 or count_noise_std <= 0 or num_counts < 0:
        raise ValueError("target_multiplier and count_noise_std must be > 0, num_counts >= 0")
    rest = target_multiplier**-2 - num_counts * (2.0 * count_noise_std) ** -2
    if rest <= 0:
        raise ValueError(
            f"count noise std {count_noise_std} is too small for {num_counts} counts at target multiplier "
            f"{target_multiplier}: need count_noise_std > sqrt(num_counts) * target / 2 = "
            f"{math.sqrt(num_counts) * target_multiplier / 2:.4g}"
        )
    return rest**-0.5

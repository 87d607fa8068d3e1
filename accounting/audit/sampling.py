"""Is a sampler Poisson? A statistical check for "shuffled batches accounted as Poisson".

The accountant's PoissonSampled(q, .) event is only valid if every user is included in every step independently
with probability q. A shuffle-and-split sampler (fixed batch size, each user exactly once per epoch) has the same
mean batch size q*N but is a different mechanism with a different, often much larger, epsilon (Chua et al. 2024),
and the one-run audit has little power to tell the two apart at an epsilon it can certify. So this bug is caught on
the sampler itself, from its inclusion statistics:

- batch sizes: under Poisson sampling each realized batch size is Binomial(N, q), so the dispersion statistic
  sum_t (b_t - N q)^2 / (N q (1 - q)) is chi-square with T degrees of freedom (normal approximation, fine for
  N q (1 - q) >= 10). Fixed-size batches give ~0, far in the lower tail.
- per-user counts: each user's number of inclusions over T steps is Binomial(T, q); shuffling makes it (nearly)
  constant. Same dispersion statistic over users, chi-square with N degrees of freedom.

Both are two-sided (too little spread and too much both break the Poisson event). Pure numpy/scipy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PoissonCheck:
    """Outcome of :func:`poisson_inclusion_test`.

    Attributes:
        batch_size_p_value: two-sided chi-square p-value of the batch-size dispersion.
        user_count_p_value: two-sided chi-square p-value of the per-user inclusion-count dispersion.
        batch_size_variance_ratio: observed batch-size variance over N q (1 - q) (1.0 for Poisson).
        user_count_variance_ratio: observed per-user count variance over T q (1 - q) (1.0 for Poisson).
        p_value: the smaller p-value times 2 (Bonferroni over the two tests), capped at 1.
    """

    batch_size_p_value: float
    user_count_p_value: float
    batch_size_variance_ratio: float
    user_count_variance_ratio: float
    p_value: float

    def rejects_poisson(self, *, confidence: float = 0.999) -> bool:
        """True when the sampler is not Poisson at ``confidence``."""
        return self.p_value < 1.0 - confidence

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _two_sided_chi2(statistic: float, dof: int) -> float:
    return float(min(1.0, 2.0 * min(stats.chi2.cdf(statistic, dof), stats.chi2.sf(statistic, dof))))


def poisson_inclusion_test(membership: np.ndarray, *, sampling_rate: float) -> PoissonCheck:
    """Test that ``membership`` ([T steps, N users] bool: user n in step t's batch) is Poisson with rate q.

    Raises:
        ValueError: on a non-2-D or non-bool matrix, q outside (0, 1), or fewer than 2 steps or users.
    """
    membership = np.asarray(membership)
    if membership.ndim != 2 or membership.dtype != np.bool_:
        raise ValueError(
            f"membership must be a [steps, users] bool matrix, got {membership.dtype} {membership.shape}"
        )
    num_steps, num_users = membership.shape
    if num_steps < 2 or num_users < 2:
        raise ValueError(f"need at least 2 steps and 2 users, got {num_steps} steps, {num_users} users")
    q = float(sampling_rate)
    if not 0.0 < q < 1.0:
        raise ValueError(f"sampling_rate must be in (0, 1) for a dispersion test, got {q}")
    sizes = membership.sum(axis=1).astype(np.float64)  # [T]
    counts = membership.sum(axis=0).astype(np.float64)  # [N]
    size_var = num_users * q * (1.0 - q)
    count_var = num_steps * q * (1.0 - q)
    size_stat = float(np.sum((sizes - num_users * q) ** 2) / size_var)
    count_stat = float(np.sum((counts - num_steps * q) ** 2) / count_var)
    p_size = _two_sided_chi2(size_stat, num_steps)
    p_count = _two_sided_chi2(count_stat, num_users)
    return PoissonCheck(
        batch_size_p_value=p_size,
        user_count_p_value=p_count,
        batch_size_variance_ratio=size_stat / num_steps,
        user_count_variance_ratio=count_stat / num_users,
        p_value=min(1.0, 2.0 * min(p_size, p_count)),
    )

"""Record every Poisson sample a stage draws, and check it against the ledger's q: the sample the accountant assumed.

Why: a recipe whose sampler used another rate than the q on its ledger events (say 2q) would train on twice the
users the ledger accounts for, and nothing else in a run would show it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from trainers.engine.sampling import PoissonUserSampler


@contextmanager
def recorded_samples() -> Iterator[list[Any]]:
    """Inside: every ``PoissonUserSampler.sample(step)`` call is recorded as (num_users, step, sample)."""
    seen: list[Any] = []
    original = PoissonUserSampler.sample

    def sample(self: PoissonUserSampler, step: int) -> torch.Tensor:
        out = original(self, step)
        seen.append((self.num_users, int(step), out.clone()))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PoissonUserSampler, "sample", sample)
        yield seen


def assert_samples_follow_the_ledger(seen: list[Any], events: list[Any], *, seed: int, num_users: int) -> None:
    """Each event's step was sampled as ``PoissonUserSampler(N, sampling_rate=event.q, seed=seed)`` would (the
    stage ran with ``run.reproducible_noise=true`` so that its key is the public stage seed)."""
    drawn = {step: s for n, step, s in seen if n == num_users}
    assert events, "no ledger events"
    for e in events:
        assert e.step in drawn, f"step {e.step} on the ledger was never sampled"
        want = PoissonUserSampler(num_users, sampling_rate=e.sampling_rate, seed=seed).sample(e.step)
        assert torch.equal(drawn[e.step], want), f"step {e.step}: the sample is not Poisson(q={e.sampling_rate})"

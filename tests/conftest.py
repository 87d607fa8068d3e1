"""Shared test setup: no Ray auth token, quiet tokenizers, one torch thread (CI has 2 cores).

One intra-op thread for the whole session: the models are tiny, so thread start-up and contention cost more than
they save (measured on the 2-core machine: tests/engine/test_engine_grads.py 28.7 s with default threads, 4.5 s
pinned), and results no longer depend on the machine's core count. A test that needs another count sets it and
restores it.
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(1)
# Property tests draw the same examples on every run: CI must not turn red on a new random draw (and a failure
# found once is found again). Explore new draws locally with HYPOTHESIS_PROFILE=explore.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _thread_count_is_restored():
    """Fail a test that leaves the process with another torch thread count (it would slow or change the rest)."""
    yield
    assert torch.get_num_threads() == 1, f"the test left torch at {torch.get_num_threads()} threads"


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for every test module that needs one (starting Ray costs ~3 s and stopping it ~1 s, once
    per module before). 4 logical CPUs: 2 learner workers next to 2 rollout actors fit. Stopped at the end of the
    session, and only if this fixture started it (a stale Ray in the process is never stopped by name)."""
    from cluster.runtime import init_ray, shutdown_ray

    runtime = init_ray(num_cpus=4, address="local")
    yield runtime
    if runtime.started_here:
        shutdown_ray()

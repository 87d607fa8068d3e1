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

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _thread_count_is_restored():
    """Fail a test that leaves the process with another torch thread count (it would slow or change the rest)."""
    yield
    assert torch.get_num_threads() == 1, f"the test left torch at {torch.get_num_threads()} threads"

"""Shared test setup: no Ray auth token, quiet tokenizers, one torch thread (CI has 2 cores), one Ray session,
and the shared tiny tokenizer (the tiny models themselves are built by tests/tiny_models.py).

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
# Ray Train in tests: its controller polls the workers every 2 s, so a run of a few seconds idles up to 2 s more
# before its end is noticed; and each run starts a preemption-watcher actor (one more Python process) and metrics
# callbacks that no test reads (node drains and Prometheus metrics are cluster operations, not dpalign's logic).
# Measured on the loaded 2-core machine, two no-op one-worker runs: 34 s of CPU with Ray's defaults, 28 s with
# these. Set before Ray starts, so its processes inherit them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from dpalign.allocator import keep_freed_memory  # noqa: E402

# The test process and the processes it starts (Ray workers, CLI subprocesses) keep freed memory, as every dpalign
# process does (dpalign.allocator), so tests run the allocator users run.
keep_freed_memory()

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
    per module before). 4 logical CPUs: 2 learner workers next to 2 rollout actors fit. Its own temporary
    directory (RAY_TMPDIR, removed afterwards; ports are Ray's free ones), so test sessions running side by side
    never share Ray's session files. Stopped at the end of the session, and only if this fixture started it (a
    stale Ray in the process is never stopped by name)."""
    import shutil
    import tempfile

    from cluster.runtime import init_ray, shutdown_ray

    before = os.environ.get("RAY_TMPDIR")
    temp_dir = tempfile.mkdtemp(prefix="dpalign-ray-", dir="/tmp")  # short: Ray's socket paths live below it
    os.environ["RAY_TMPDIR"] = temp_dir
    try:
        runtime = init_ray(num_cpus=4, address="local")
        yield runtime
        if runtime.started_here:
            shutdown_ray()
    finally:
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_module(request, ray_cluster):
    """The session's Ray for one test module, with that module and tests/tiny_models.py pickled by value: Ray
    workers import no test module by name (tests/ is not a package on their path)."""
    import ray
    import ray.cloudpickle

    from tests import tiny_models

    for module in (request.module, tiny_models):
        ray.cloudpickle.register_pickle_by_value(module)
    yield ray


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    """One ``run.cache_dir`` for the tests that run launch/configs/tiny.yaml: its public data, tokenizer and
    pretrained base model are built once per session instead of once per module. Entries are keyed by their
    config, so a test with other data or model settings builds its own; a test that checks a fresh build (the
    ``built`` flag) uses its own tmp_path instead."""
    return str(tmp_path_factory.mktemp("tiny_cache"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The project's BPE tokenizer trained on tests/tiny_models.SENTENCES (300 symbols), trained once per session.
    Read-only: tests save it next to their models, never change it."""
    from tests.tiny_models import tiny_tokenizer

    return tiny_tokenizer()


def pytest_collection_modifyitems(config, items):
    """Modules with ``heavy`` tests run first, the most marked seconds first; every other module, and the tests
    within a module, keep their order (a stable sort, so module-scoped fixtures are still built once).

    Why: ``make test`` runs the suite on two pytest-xdist workers, one module at a time each (``--dist loadscope``),
    in this order. The few end-to-end tests that start Ray, Tune or subprocesses take most of the suite's time; begun
    last, one of them would run alone on one core at the end while the other worker idles."""
    cost: dict[str, float] = {}
    for item in items:
        mark = item.get_closest_marker("heavy")
        if mark is not None:
            key = item.nodeid.split("::")[0]
            cost[key] = cost.get(key, 0.0) + float(mark.args[0] if mark.args else 1.0)
    items.sort(key=lambda item: -cost.get(item.nodeid.split("::")[0], 0.0))

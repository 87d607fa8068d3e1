# Two commands for users: `make run` and `make test`. Both create or reuse the project-local venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
CONFIG ?= launch/configs/demo.yaml
export RAY_AUTH_MODE ?= disabled
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv lock run test test-slow mutate bench bench-gpu bench-utility tune lint clean

venv: $(STAMP)

# torch first, pinned: it resolves to the CPU wheel on disk; a bare `torch` may pull a multi-GB CUDA build.
# Then every other package at the version in requirements.lock (what CI tested), then the project itself
# without resolving anything. The stamp depends on pyproject.toml and the lock, so a second `make test` installs
# nothing and a changed lock reinstalls.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Refresh requirements.lock after changing dependencies in pyproject.toml (then `make test` and commit both):
# uv resolves the dev and loggers extras for CPython 3.11 on Linux x86_64, preferring the versions already in the
# lock, with torch overridden to its CPU build (tools/lock-overrides.txt). LOCK_INDEXES names where the CPU torch
# wheel and the packages come from (this machine's local mirrors by default; elsewhere, e.g.
# LOCK_INDEXES='--extra-index-url https://download.pytorch.org/whl/cpu').
LOCK_INDEXES ?= --find-links /opt/wheels --extra-index-url file:///opt/pypi/simple --extra-index-url file:///opt/pypi-more/simple
lock: $(STAMP)
	$(PY) -m pip install -q 'uv>=0.4'
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra loggers --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match $(LOCK_INDEXES) \
		--override tools/lock-overrides.txt --no-emit-find-links --no-emit-index-url --custom-compile-command "make lock" -o $(LOCK)

run: $(STAMP)
	$(VENV)/bin/dpalign run --config $(CONFIG)

# pytest exits 5 when it collects no test: not a failure of the suite itself. Two pytest-xdist workers, one test
# module at a time each, the modules with `heavy` tests first (tests/conftest.py); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder || [ $$? -eq 5 ]

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

# The privacy core's mutation suite (tools/mutate.py): each privacy bug applied to a copy of the tree must be
# killed by the fast tests it names; fails if one survives. About 3.5 minutes on 2 cores (--jobs 2); not part of `make test`.
mutate: $(STAMP)
	$(PY) tools/mutate.py

# Benchmarks print JSON with ratios against a baseline measured in the same run.
bench: $(STAMP)
	$(PY) benchmarks/accounting.py --json
	$(PY) benchmarks/dp_overhead.py --json
	$(PY) benchmarks/controller.py --json
	$(PY) benchmarks/ppo_iteration.py --json
	$(PY) benchmarks/demo_speedups.py --json

# The overhead and PPO benchmarks at GPT-2-small scale on a CUDA device, bf16, JSON under benchmarks/results/.
bench-gpu: $(STAMP)
	PY=$(PY) benchmarks/gpu.sh

# The privacy-utility table (Wu et al. Table 1 style): 21 full demo runs (non-private, eps 1/2/4/8, and the
# decoupled and ppo_only decomposition rows at eps 4; 3 seeds each), 2 at a time: about 2.5 hours on 2 cores.
bench-utility: $(STAMP)
	$(PY) benchmarks/privacy_utility.py --json

# The demo budget-allocation study, twice: on a public proxy population (tuning costs nothing; the chosen
# configuration then runs once on the private data), and repeat_and_select on the private data with the whole study
# at epsilon 4. Each prints the study's best public utility and total epsilon as JSON (benchmarks/tune_study.py).
# Nine demo-size pipeline runs and a secret number more: about 1 hour on 2 cores (README, "Budget-allocation studies").
TUNE_CONFIG ?= launch/configs/tune-demo.yaml
tune: $(STAMP)
	$(PY) benchmarks/tune_study.py --config $(TUNE_CONFIG) study.mode=public_proxy
	$(PY) benchmarks/tune_study.py --config $(TUNE_CONFIG) study.mode=repeat_and_select

lint: $(STAMP)
	$(VENV)/bin/ruff check dpalign accounting trainers controller cluster launch tests benchmarks tools

clean:
	rm -rf $(VENV) .cache runs studies

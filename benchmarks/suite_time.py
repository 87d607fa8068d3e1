"""The default test suite's wall time against an older commit's, measured in one run on this machine.

    .venv/bin/python benchmarks/suite_time.py --json                      # baseline 0c7f519 (issue 19), ~12 min
    .venv/bin/python benchmarks/suite_time.py --baseline HEAD~5 --paths tests/engine --json

Why a same-run baseline: the suite's time on a 2-core machine moves by a third between days (page cache, load), so
"N seconds" from another session compares machines, not suites. This script clones the repository at
``--baseline`` into a temporary directory and times, back to back and with this checkout's venv:

1. ``baseline``: that commit's own default suite (``pytest -q``, its own pyproject's options), run from the clone;
2. ``same_tests_now``: the tests of (1) that still exist here (by ``file::function``), under ``make test``'s runner
   (``-n WORKERS --dist loadscope --no-loadscope-reorder``); the ratio to (1) is the speed-up of the suite the
   baseline had;
3. ``full_suite_now`` (unless ``--skip-full``): this checkout's whole default suite under the same runner; its
   ratio to (1) includes every test added since.

Seconds are pytest's own ("in N s": collection and tests, no install). ``--paths`` limits all three to some test
files or directories (the smoke test uses it). Prints a table, or one JSON line with ``--json``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/ last on the path (it is already first when this runs as a script): a test that loads this file must
# not let benchmarks/controller.py shadow the project's controller package.
sys.path.append(os.path.dirname(os.path.abspath(__file__)))

from _common import REPO, LoadAverage, emit  # noqa: E402

BASELINE = "0c7f519"
"""The commit issue 19 timed (2 min 36 s on the machine where it was filed)."""
SUMMARY = re.compile(r"=*\s*(?P<body>.*?) in (?P<secs>[0-9.]+)s")


def summary(output: str) -> dict:
    """pytest's last summary line as numbers: ``{"passed": 420, ..., "seconds": 130.78}``."""
    for line in reversed(output.strip().splitlines()):
        m = SUMMARY.search(line)
        if m and re.search(r"\d+ (passed|failed|error)", m["body"]):
            counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                                         m["body"])}
            return {**counts, "seconds": float(m["secs"])}
    raise RuntimeError(f"no pytest summary in the output:\n{output[-2000:]}")


def collected_functions(root: Path, env: dict[str, str], paths: list[str]) -> list[str]:
    """The default suite's tests under ``root`` as ``file::function`` (parameters folded), sorted."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *paths], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"collection failed in {root}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return sorted({line.split("[")[0] for line in proc.stdout.splitlines() if "::" in line})


def run_pytest(root: Path, env: dict[str, str], args: list[str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *args], cwd=root, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pytest failed (exit {proc.returncode}) in {root}:\n{proc.stdout[-3000:]}")
    return {**summary(proc.stdout), "wall_s": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=BASELINE, help=f"commit to compare with (default {BASELINE})")
    ap.add_argument("--workers", type=int, default=2, help="xdist workers of the runs of this checkout (make test's)")
    ap.add_argument("--paths", nargs="*", default=[], help="test files or directories to limit every run to")
    ap.add_argument("--skip-full", action="store_true", help="do not time this checkout's whole suite")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--json-out", help="also write the JSON here")
    args = ap.parse_args(argv)
    commit, head = (subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True,
                                   check=True).stdout.strip() for rev in (args.baseline, "HEAD"))
    runner = ["-n", str(args.workers), "--dist", "loadscope", "--no-loadscope-reorder"] if args.workers else []
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    load = LoadAverage()
    work = Path(tempfile.mkdtemp(prefix="dpalign-suite-"))
    try:
        clone = work / "baseline"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
        if (REPO / ".cache").is_dir():  # the same built caches (tiny data, base models) for both suites
            (clone / ".cache").symlink_to(REPO / ".cache", target_is_directory=True)
        base_env = {**env, "PYTHONPATH": str(clone)}
        then = set(collected_functions(clone, base_env, args.paths))
        now = collected_functions(REPO, env, args.paths)
        same = [t for t in now if t in then]
        baseline = run_pytest(clone, base_env, args.paths)
        same_now = run_pytest(REPO, env, [*runner, *same])
        full = None if args.skip_full else run_pytest(REPO, env, [*runner, *args.paths])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load.stop()
    blob = {
        "benchmark": "suite_time", "head": head, "baseline_commit": commit, "workers": args.workers,
        "paths": args.paths, **load.fields(),
        "baseline": {**baseline, "test_functions": len(then)},
        "same_tests_now": {**same_now, "test_functions": len(same), "gone_since": sorted(then - set(now)),
                           "ratio_to_baseline": round(same_now["seconds"] / baseline["seconds"], 3)},
    }
    if full is not None:
        blob["full_suite_now"] = {**full, "test_functions": len(now),
                                  "ratio_to_baseline": round(full["seconds"] / baseline["seconds"], 3)}
    if not args.json:
        print(f"{'run':<16} {'passed':>7} {'seconds':>8} {'ratio':>6}")
        print(f"{'baseline ' + commit:<16} {baseline.get('passed', 0):>7} {baseline['seconds']:>8.1f} {1.0:>6.2f}")
        for key in ("same_tests_now", "full_suite_now"):
            if key in blob:
                r = blob[key]
                print(f"{key:<16} {r.get('passed', 0):>7} {r['seconds']:>8.1f} {r['ratio_to_baseline']:>6.2f}")
        print(load.line())
    emit(blob, as_json=args.json, json_out=args.json_out)
    return blob


if __name__ == "__main__":
    main()

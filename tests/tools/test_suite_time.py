"""benchmarks/suite_time.py: the suite's time against an older commit's, both measured in the same run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("suite_time", Path(__file__).resolve().parents[2] / "benchmarks" /
                                              "suite_time.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_summary_reads_pytests_last_line_with_and_without_xdist():
    assert bench.summary("....\n420 passed, 58 warnings in 130.78s (0:02:10)\n") == {"passed": 420, "seconds": 130.78}
    line = "=== 1 failed, 599 passed, 3 skipped, 37 deselected, 110 warnings in 450.14s (0:07:30) ==="
    assert bench.summary(f"x\n{line}\n") == {"failed": 1, "passed": 599, "skipped": 3, "deselected": 37,
                                              "seconds": 450.14}
    with pytest.raises(RuntimeError, match="no pytest summary"):
        bench.summary("collected 0 items\n")


@pytest.mark.slow  # ~30 s: five pytest processes (two collections, three timed runs)
def test_same_run_comparison_on_one_file_against_this_commit(capsys):
    blob = bench.main(["--baseline", "HEAD", "--paths", "tests/core/test_core_stats.py", "--workers", "0",
                       "--json"])
    assert blob["baseline"]["passed"] == blob["same_tests_now"]["passed"] == blob["full_suite_now"]["passed"] > 0
    assert blob["same_tests_now"]["gone_since"] == [] and blob["baseline"]["test_functions"] > 0
    for key in ("same_tests_now", "full_suite_now"):
        assert blob[key]["ratio_to_baseline"] == pytest.approx(blob[key]["seconds"] / blob["baseline"]["seconds"],
                                                               abs=1e-3)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"benchmark": "suite_time"')

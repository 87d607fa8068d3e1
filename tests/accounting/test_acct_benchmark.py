"""Smoke run of benchmarks/accounting.py: one JSON object with timings, epsilons and the ratio to the target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_prints_json_within_target():
    out = subprocess.run(
        [sys.executable, "benchmarks/accounting.py", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["distinct_mechanisms"] == 1000 and result["steps"] == 100_000
    assert result["varied"]["accountant"] == "rdp" and result["fixed"]["accountant"] == "pld"
    assert result["varied_ratio_to_target"] == result["varied"]["seconds"] / result["target_seconds"]
    assert result["meets_target"] is True
    assert 0 < result["fixed"]["epsilon"] < result["varied"]["epsilon"] < 10

"""Smoke run of benchmarks/controller.py (slow: builds the tiny embedded task and base model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_controller_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_controller", ROOT / "benchmarks" / "controller.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(
        [
            "--seeds",
            "1",
            "--steps",
            "4",
            "--interval",
            "2",
            "--eval-every",
            "2",
            "--epsilons",
            "2",
            "--methods",
            "fixed",
            "online",
            "--json",
            "data.num_users=300",
            f"run.cache_dir={tmp_path}",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    methods = out["table"]["2.0"]["methods"]
    assert set(methods) == {"fixed", "online"}
    assert all(r["epsilon_spent"] <= 2.0 for r in out["runs"])
    assert methods["online"]["overhead_share"] > 0 and len(methods["fixed"]["curve_ppl"]) == 3

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


def test_clinical_benchmark_reports_headroom_and_the_gap_each_method_closes(tmp_path, capsys, tiny_cache):
    """On the clinical domain: the non-private run (one per seed, shared by every epsilon) gives the headroom over
    the base model and the far end of each private method's gap; the private run spends exactly its epsilon."""
    spec = importlib.util.spec_from_file_location("bench_controller", ROOT / "benchmarks" / "controller.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--seeds", "1", "--steps", "6", "--eval-every", "3", "--epsilons", "1", "4", "--methods", "nonprivate",
            "fixed", "--json", "data.num_users=120", "data.private_domain=clinical", f"run.cache_dir={tiny_cache}"]
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["settings"]["config"] == "launch/configs/tiny.yaml"  # no machine path in the committed JSON
    nonprivate = [r for r in out["runs"] if r["method"] == "nonprivate"]
    assert [r["epsilon_target"] for r in nonprivate] == [1.0, 4.0] and nonprivate[0]["curve"] == nonprivate[1]["curve"]
    for eps in ("1.0", "4.0"):
        t = out["table"][eps]
        m = t["methods"]
        assert t["base_ppl"] == pytest.approx(nonprivate[0]["curve"][0][1])
        assert t["nonprivate_headroom"] == pytest.approx(1 - m["nonprivate"]["final_ppl"] / t["base_ppl"])
        assert t["nonprivate_headroom"] > 0  # six non-private steps on notes the base model never saw already help
        assert m["fixed"]["gap_closed"] == 0.0 and m["nonprivate"]["gap_closed"] == pytest.approx(1.0)
        assert m["fixed"]["steps_to_fixed"] == 6 and float(eps) * 0.999 < m["fixed"]["max_epsilon_spent"] <= float(eps)

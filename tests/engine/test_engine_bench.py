"""Smoke runs of the performance benchmarks at tiny sizes: their JSON parses and every ratio is a quotient of two
numbers measured in the same run (no timing is asserted: performance is measured, not tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, *args, "--json", "--json-out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert "load average" in proc.stdout
    return printed


def _check_overhead(blob: dict, variants: list[str]) -> None:
    assert blob["benchmark"] == "dp_overhead" and len(blob["load_avg"]["before"]) == 3
    for by_setting in blob["results"].values():
        for setting, rows in by_setting.items():
            assert sorted(rows) == sorted(variants)
            ref, opacus = rows["nonprivate"], rows["opacus"]
            glibc = setting.endswith("+glibc")  # --malloc default/both: glibc's default allocator under this label
            for name, r in rows.items():
                assert r["setting"] == setting.removesuffix("+glibc") and r["ms_per_step"] > 0 and r["peak_rss_mb"] > 0
                assert r["malloc"] == ("glibc default" if glibc else "dpalign")
                assert r["minor_faults_per_step"] >= 0 and r["sys_ms_per_step"] >= 0
                if name != "nonprivate":
                    assert r["time_ratio"] == pytest.approx(r["ms_per_step"] / ref["ms_per_step"])
                    assert r["peak_ratio"] == pytest.approx(r["peak_rss_mb"] / ref["peak_rss_mb"])
                if name != "opacus":
                    assert r["time_vs_opacus"] == pytest.approx(r["ms_per_step"] / opacus["ms_per_step"])
            if "engine_ref" in rows:
                eng = rows["engine"]
                assert eng["time_vs_engine_ref"] == pytest.approx(eng["ms_per_step"] / rows["engine_ref"]["ms_per_step"])
    all4 = next(iter(blob["results"].values()))["all4"]["engine"]
    assert all4["lora_targets"] == ["c_attn", "c_proj", "c_fc"] and all4["records_per_user"] == 4


@pytest.mark.heavy(22)
def test_dp_overhead_json_carries_ratios_of_one_run(tmp_path):
    variants = ["nonprivate", "engine", "opacus"]
    blob = _run(["benchmarks/dp_overhead.py", "--sizes", "tiny", "--settings", "all4", "--steps", "1", "--batch", "8",
                 "--seq", "8", "--variants", ",".join(variants)], tmp_path / "overhead.json")
    _check_overhead(blob, variants)


@pytest.mark.slow
def test_dp_overhead_every_variant_and_setting(tmp_path):
    variants = ["nonprivate", "engine", "engine_ref", "opacus", "opacus_ghost"]
    blob = _run(["benchmarks/dp_overhead.py", "--sizes", "tiny", "--settings", "attn1,all4", "--steps", "1",
                 "--batch", "8", "--seq", "8", "--variants", ",".join(variants), "--malloc", "both"],
                tmp_path / "overhead.json")
    _check_overhead(blob, variants)
    assert sorted(blob["results"]["tiny"]) == ["all4", "all4+glibc", "attn1", "attn1+glibc"]


@pytest.mark.heavy(8)
def test_ppo_iteration_json_has_shares_and_a_generate_yardstick(tmp_path):
    blob = _run(["benchmarks/ppo_iteration.py", "--size", "tiny", "--records", "4", "--eval-prompts", "2",
                 "--iterations", "1", "--max-new-tokens", "3", "--rollout-batch-size", "2"], tmp_path / "ppo.json")
    r = blob["result"]
    assert set(r["share"]) == {"generation", "scoring", "learner", "lora_sync", "public_eval"}
    assert sum(r["share"].values()) == pytest.approx(1.0)
    assert r["iteration_s"] == pytest.approx(sum(r["seconds"].values()))
    assert r["generate_tokens_per_s_ratio"] == pytest.approx(
        r["generated_tokens_per_s"] / r["plain_generate_tokens_per_s"])


def test_demo_speedups_json_compares_each_setting_with_its_baseline(tmp_path):
    blob = _run(["benchmarks/demo_speedups.py", "--records", "2", "--seq", "8", "--reps", "2", "--prompts", "6",
                 "--batch-sizes", "2,6", "--max-new-tokens", "2"], tmp_path / "speedups.json")
    act, gen = blob["activation"], blob["generation"]
    assert act["speedup"] == pytest.approx(act["gelu_new_ms"] / act["gelu_pytorch_tanh_ms"])
    assert 0 < act["max_abs_diff"] < 1e-5  # two kernels of one function: they round differently, nothing more
    assert list(gen["seconds"]) == ["2", "6"] and gen["ratio_to_first"]["2"] == 1.0
    assert gen["ratio_to_first"]["6"] == pytest.approx(gen["seconds"]["6"] / gen["seconds"]["2"])

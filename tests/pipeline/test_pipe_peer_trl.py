"""benchmarks/peer_trl.py runs both pipelines end to end and reports every number it promises (slow: TRL trains
three stages after dpalign's three; the measured table is in the README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_peer_benchmark_reports_both_systems(tmp_path):
    pytest.importorskip("trl")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRL_EXPERIMENTAL_SILENCE": "1"}
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "peer_trl.py"), "--json", f"run.cache_dir={tmp_path}",
         "sft.steps=2", "rm.steps=2", "rm.gold_pairs=8", "ppo.iterations=2", "ppo.max_new_tokens=6",
         "eval.prompts=4", "eval.max_new_tokens=6", "eval.perplexity_records=4"],
        capture_output=True, text=True, timeout=1800, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for system in ("dpalign", "trl"):
        r = result[system]
        for policy in ("sft", "final"):
            g = r["gold_reward"][policy]
            assert g["lo"] <= g["mean"] <= g["hi"] and g["n"] == 4, (system, policy)
        assert 0.0 <= r["rm_accuracy"] <= 1.0 and r["kl_final_to_sft"] is not None
        assert all(r["wall_time_s"][s] > 0 for s in ("sft", "rm", "ppo")), system
    assert set(result["ratios_dpalign_over_trl"]) == {"wall_sft", "wall_rm", "wall_ppo"}
    dp = result["dp_sft"]  # dpalign's DP-SFT against Opacus + a plain loop at the same (epsilon, delta)
    assert dp["target_epsilon"] == 4.0 and 0 < dp["delta"] < 1
    assert 0 < dp["dpalign"]["epsilon"] <= 4.0 + 1e-9 and dp["dpalign"]["privacy_unit"] == "user"
    assert 0 < dp["opacus"]["epsilon"] <= 4.0 * 1.01 and dp["opacus"]["privacy_unit"] == "record"
    assert dp["opacus"]["delta"] == dp["delta"] and dp["opacus"]["steps"] == 2 and dp["opacus"]["noise_multiplier"] > 0
    for system in ("base", "dpalign", "opacus"):
        assert dp[system]["perplexity"] > 1 and dp[system]["gold_reward"]["n"] == 4, system

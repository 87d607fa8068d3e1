"""The privacy-utility benchmark's table arithmetic (the runs themselves are the benchmark, not a test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "privacy_utility", Path(__file__).resolve().parents[2] / "benchmarks" / "privacy_utility.py"
)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def _row(setting: str, seed: int, *, sft: float, final: float, eps: float | None = None) -> dict:
    return {"setting": setting, "seed": seed, "epsilon": eps, "gold": {"base": 0.0, "sft": sft, "final": final},
            "kl": 1.0, "rm_accuracy": 0.7}


def test_shares_of_the_nonprivate_gain_both_ways() -> None:
    rows = [
        _row("nonprivate", 0, sft=0.10, final=0.30),
        _row("nonprivate", 1, sft=0.10, final=0.50),  # gain 0.30 on average
        _row("eps=4", 0, sft=0.00, final=0.24, eps=3.99),
        _row("eps=4", 1, sft=0.00, final=0.24, eps=4.0),
    ]
    table = bench.summarize(rows)
    np, p = table["nonprivate"], table["eps=4"]
    assert np["final"]["mean"] == pytest.approx(0.40) and np["final"]["n"] == 2
    assert np["final"]["lo"] < 0.40 < np["final"]["hi"]
    assert np["share_own_sft"] == pytest.approx(1.0)
    assert p["share_own_sft"] == pytest.approx(0.24 / 0.30)  # its own SFT is worse: its PPO gain is 0.24
    assert p["share_vs_nonprivate_sft"] == pytest.approx(0.14 / 0.30)  # against the non-private SFT
    assert p["epsilon"] == pytest.approx(4.0) and p["seeds"] == 2
    assert p["gain_over_own_sft"]["mean"] == pytest.approx(0.24)


def test_no_share_when_the_nonprivate_pipeline_does_not_gain() -> None:
    rows = [_row("nonprivate", 0, sft=0.2, final=0.1), _row("eps=1", 0, sft=0.0, final=0.3, eps=1.0)]
    table = bench.summarize(rows)
    assert table["eps=1"]["share_own_sft"] is None and table["eps=1"]["share_vs_nonprivate_sft"] is None

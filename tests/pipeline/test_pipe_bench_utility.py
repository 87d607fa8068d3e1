"""The privacy-utility benchmark's table arithmetic (the runs themselves are the benchmark, not a test)."""

from __future__ import annotations

import importlib.util
import json
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


def test_share_intervals_over_seeds_come_with_the_shares() -> None:
    rows = [_row("nonprivate", s, sft=0.10, final=0.40 + 0.02 * s) for s in range(3)] + [
        _row("eps=4", s, sft=0.05, final=0.30 + 0.01 * s, eps=4.0) for s in range(3)
    ]
    p = bench.summarize(rows)["eps=4"]
    ci = p["share_own_sft_ci"]
    assert ci["mean"] == pytest.approx(p["share_own_sft"])
    assert ci["lo"] < p["share_own_sft"] < ci["hi"]


def test_epsilon_at_delta_one_over_n_is_recomputed_from_the_ledger(tmp_path: Path) -> None:
    from accounting.events import PrivacyEvent
    from accounting.ledger import Ledger
    from accounting.ledger_file import read_ledger, stage_epsilon_at

    ledger = Ledger.open(tmp_path / "ledger.jsonl", run_id="r", target_epsilon=8.0, target_delta=1e-6)
    for stage, n, sigma in (("sft", 1000, 1.0), ("rm", 4000, 0.8)):
        ledger.begin_stage(stage, user_fingerprint=f"sha256:{stage}", num_users=n)
        for t in range(20):
            ledger.record(PrivacyEvent(stage=stage, step=t, purpose="gradient", sampling_rate=0.05,
                                       noise_multiplier=sigma))
    ledger.close()
    contents = read_ledger(tmp_path / "ledger.jsonl")
    at_target = stage_epsilon_at(contents, "rm", delta=1e-6)
    eps = bench.epsilon_at_one_over_n(tmp_path)
    expected = max(stage_epsilon_at(contents, "sft", delta=1e-3), stage_epsilon_at(contents, "rm", delta=1 / 4000))
    assert eps == pytest.approx(expected)
    assert eps < max(at_target, stage_epsilon_at(contents, "sft", delta=1e-6))  # a larger delta: a smaller epsilon
    with pytest.raises(KeyError, match="no stage 'ppo'"):
        stage_epsilon_at(contents, "ppo", delta=1e-3)
    assert bench.epsilon_at_one_over_n(tmp_path / "missing") is None


def test_a_run_whose_report_disagrees_with_its_ledger_fails_verification(tmp_path: Path) -> None:
    from accounting.events import PrivacyEvent
    from accounting.ledger import Ledger
    from accounting.ledger_file import compute_privacy, read_ledger

    ledger = Ledger.open(tmp_path / "ledger.jsonl", run_id="r", target_epsilon=8.0, target_delta=1e-6)
    ledger.begin_stage("sft", user_fingerprint="sha256:sft", num_users=1000)
    for t in range(5):
        ledger.record(PrivacyEvent(stage="sft", step=t, purpose="gradient", sampling_rate=0.05, noise_multiplier=1.0))
    ledger.close()
    privacy = compute_privacy(read_ledger(tmp_path / "ledger.jsonl"))
    (tmp_path / "report.json").write_text(json.dumps({"privacy": privacy}))
    assert bench.verify(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"privacy": {**privacy, "epsilon": privacy["epsilon"] / 2}}))
    assert not bench.verify(tmp_path)
    (tmp_path / "ledger.jsonl").unlink()
    assert bench.verify(tmp_path) is False  # a private report without its ledger cannot verify
    (tmp_path / "report.json").write_text(json.dumps({"privacy": None}))
    assert bench.verify(tmp_path) is None  # a non-private run has nothing to verify

"""Black-box audits on REAL stages of the tiny config: record canaries (one-run), exposure and MIA helpers.

The stage runs are seeded (coins, secrets, sampler and noise), so the numbers below are fixed; each assertion can
fail: a canary score that ignored training would give AUC ~0.5 in the power check, a broken ledger would leave the
claim at inf, and a leaky scorer would let eps_lb exceed the claim.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from accounting.audit.mia import max_auc_under_dp
from launch.config import load_config
from launch.run_audits import heldout_rows
from launch.schema import RunConfig
from trainers.audit.records import rm_canary_rows, run_record_canary_audit, sft_canary_rows

TINY = "launch/configs/tiny.yaml"


@pytest.fixture(scope="module")
def cache(tiny_cache: str) -> str:
    return tiny_cache


def _cfg(cache: str, *overrides: str) -> RunConfig:
    return load_config(RunConfig, TINY, [f"run.cache_dir={cache}", *overrides])


def test_canary_rows_are_seeded_distinct_and_keyed() -> None:
    a, b = sft_canary_rows(16, seed=3, digits=8), sft_canary_rows(16, seed=3, digits=8)
    assert a == b and a != sft_canary_rows(16, seed=4, digits=8)
    assert len({r["prompt"] for r in a}) == 16  # a per-user key: each record is memorizable on its own
    assert all(len(r["response"].split()) == 8 for r in a)
    rm = rm_canary_rows(64, seed=0, digits=6)
    assert all(r["chosen"] != r["rejected"] for r in rm)
    # the label direction is a fair coin independent of the data: both directions occur
    first = {r["user_id"]: r for r in rm}
    assert 10 < sum(r["chosen"] < r["rejected"] for r in first.values()) < 54


@pytest.mark.heavy(16)
def test_private_sft_record_canary_audit_is_consistent_with_its_claim(cache: str) -> None:
    cfg = _cfg(cache, "sft.steps=3", "sft.expected_batch_users=12")
    res = run_record_canary_audit(cfg, stage="sft", m=32, seed=0)
    assert res.private and res.accountant == "pld" and res.steps == 3
    assert 0.0 < res.claimed_epsilon <= cfg.privacy.target_epsilon + 1e-9
    assert res.noise_multiplier is not None and res.noise_multiplier > 0
    assert res.audit.num_canaries == 32 and res.num_users == 24 + int(res.included.sum())
    assert res.audit.epsilon_lb <= res.claimed_epsilon and not res.flagged
    assert res.verdict.startswith("consistent")
    assert np.all(np.isfinite(res.scores))
    d = res.to_dict()
    assert d["claimed"]["epsilon"] == pytest.approx(res.claimed_epsilon) and d["flagged"] is False


@pytest.mark.slow
def test_nonprivate_rm_record_canary_scores_have_power(cache: str) -> None:
    # Privacy OFF, large lr, several epochs: the reward model memorizes the canaries' random label directions.
    cfg = _cfg(cache, "privacy.preset=nonprivate", "privacy.delta=0.00001", "rm.steps=60", "rm.expected_batch_users=27", "rm.lora.r=16",
               "rm.lr=0.01", "rm.gold_pairs=8")
    res = run_record_canary_audit(cfg, stage="rm", m=64, seed=0)
    assert not res.private and math.isinf(res.claimed_epsilon) and not res.flagged
    # Clear membership signal: the AUC's 95% interval excludes chance (measured 0.72 at this seed). eps_lb stays 0
    # with 64 canaries on a 2-layer model: the one-run bound needs near-perfect top guesses, not a good AUC.
    assert res.auc.auc > 0.65 and res.auc.low > 0.5, res.auc


def test_heldout_users_come_from_the_members_distribution() -> None:
    from trainers.data.task import CANARY_PREFIX, generate_task

    cfg = load_config(RunConfig, TINY, []).data
    rows = heldout_rows(cfg, stage="sft", count=5)
    users = {r["user_id"] for r in rows}
    assert len(users) == 5 and all(int(u[1:]) >= cfg.num_users for u in users)
    # the enlarged generation reproduces the members' own records (same generator, seed and catalogue)
    members = {(r["user_id"], r["prompt"], r["response"]) for r in generate_task(cfg)["sft"]
               if r["prompt"] != CANARY_PREFIX}
    from dataclasses import replace

    big = generate_task(replace(cfg, num_users=cfg.num_users + 40, public_reviews=10, eval_prompts=1))["sft"]
    same = {(r["user_id"], r["prompt"], r["response"]) for r in big
            if int(r["user_id"][1:]) < cfg.num_users and r["prompt"] != CANARY_PREFIX}
    shared_users = {u for u, _, _ in same} & {u for u, _, _ in members}
    assert shared_users
    assert {x for x in same if x[0] in shared_users} == {x for x in members if x[0] in shared_users}


def test_max_auc_under_dp_matches_the_tradeoff_curve() -> None:
    assert max_auc_under_dp(0.0, 0.0) == pytest.approx(0.5)
    for eps in (0.5, 1.0, 4.0):
        assert max_auc_under_dp(eps, 0.0) == pytest.approx(math.exp(eps) / (1 + math.exp(eps)))
    assert max_auc_under_dp(1.0, 1e-3) > max_auc_under_dp(1.0, 0.0)
    assert max_auc_under_dp(math.inf, 0.0) == 1.0
    with pytest.raises(ValueError, match="epsilon"):
        max_auc_under_dp(-1.0, 0.0)

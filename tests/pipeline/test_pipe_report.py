"""report.json schema, agreement with `dpalign privacy verify`, PNG plots, and the 95% interval helper."""

from __future__ import annotations

import json

import pytest
from scipy import stats

from accounting.composition import user_set_fingerprint
from accounting.events import PrivacyEvent
from accounting.ledger import Ledger
from accounting.verify import verify_run
from dpalign.stats import ci_entry, mean_ci95
from launch.pipeline.report import (
    ReportSchemaError,
    StagePrivacy,
    budget_violations,
    build_report,
    load_report,
    stage_entry,
    validate_report,
    write_report,
)
from trainers.stages.config import presets

PNG = b"\x89PNG\r\n\x1a\n"
Q, SIGMA, STEPS = 0.1, 1.5, 4
RUN_ID = "run-1"


def _ledger(run_dir, run_id):
    with Ledger.open(
        run_dir / "ledger.jsonl", run_id=run_id, target_epsilon=4.0, target_delta=1e-3, composition="parallel"
    ) as ledger:
        for stage, users in (("sft", ["a", "b"]), ("rm", ["c"])):
            ledger.begin_stage(stage, user_fingerprint=user_set_fingerprint(users), num_users=100)
            for step in range(STEPS):
                ledger.record(PrivacyEvent(stage, step, "gradient", Q, SIGMA))
            ledger.end_stage(stage)
        return ledger.report()


@pytest.fixture(scope="module")
def ledger_run(tmp_path_factory):
    """One real ledger (sft and rm private, ppo public) shared by the tests: PLD accounting takes seconds."""
    run_dir = tmp_path_factory.mktemp("ledger")
    return run_dir, _ledger(run_dir, RUN_ID)


def _run_dir(tmp_path, ledger_run):
    src, _ = ledger_run
    (tmp_path / "ledger.jsonl").write_bytes((src / "ledger.jsonl").read_bytes())
    return tmp_path


def _report(run_id, privacy, **changes):
    """sft and rm private (as in the toy ledger), ppo public."""
    protection = presets("private")
    stages = {}
    for name, prot in protection.items():
        sp = None
        if name in ("sft", "rm") and privacy is not None:
            sp = StagePrivacy(
                target_epsilon=4.0,
                delta=1e-3,
                epsilon_spent=privacy["stages"][name]["epsilon"],
                accountant="pld",
                composition="parallel",
                noise_multiplier=SIGMA,
                sampling_rate=Q,
                steps=STEPS,
                repeats=1,
                num_users=100,
                expected_batch_users=Q * 100,
                grad_noise_multiplier=SIGMA,
                count_noise_std=None,
                num_groups=2,
            )
        private = sp is not None
        reason = prot.reason if private else "toy run: ppo not private"
        stages[name] = stage_entry(
            private=private, reason=reason, status="completed", wall_time_s=None if private else 1.0, privacy=sp,
            metrics={"final_loss_noisy": 0.7},
        )
    evaluation = {
        "prompts": 8,
        "seeds": [0],
        "policies": {
            name: {"gold_reward": ci_entry([0.1 * i + k for i in range(8)]), "kl_to_sft": 0.2, "perplexity": 30.0}
            for k, name in enumerate(("base", "sft", "final"))
        },
        "reward_model": {"accuracy": 0.75, "pairs": 64},
    }
    series = {
        "ppo": [{"iteration": i, "gold_reward": 0.1 * i, "kl": 0.05 * i} for i in range(5)],
        "epsilon": {"sft": [[s, 0.3 * (s + 1)] for s in range(STEPS)], "rm": [[0, 0.3], [3, 1.0]]},
    }
    kwargs = dict(
        run_id=run_id, preset="private", status="completed", stages=stages, ledger_privacy=privacy,
        evaluation=evaluation, series=series, wall_time_s={"ppo": 1.0, "eval": 2.0},
        noise={"secret": True, "secure_rng": False, "description": "secret", "warning": None},
        versions_info={"python": "3", "torch": "x"},
    )
    kwargs.update(changes)
    return build_report(**kwargs)


def test_report_round_trip_plots_and_verify(tmp_path, ledger_run):
    tmp_path = _run_dir(tmp_path, ledger_run)
    privacy = ledger_run[1]
    report = _report(RUN_ID, privacy)
    report["base_model"] = {"path": "base", "built": True, "params": 1000, "perplexity": 4.5,
                            "unigram_perplexity": 9.0}
    assert {n for n, s in report["stages"].items() if s["privacy"]} == {"sft", "rm"}
    paths = write_report(
        report, report_json=tmp_path / "report.json", report_md=tmp_path / "report.md", plots_dir=tmp_path / "plots"
    )
    for name in ("gold_reward", "epsilon", "kl"):
        assert paths[name].read_bytes()[:8] == PNG
    md = (tmp_path / "report.md").read_text()
    assert "plots/gold_reward.png" in md and "| rm | yes |" in md and "[0.000" not in md
    # the base model's own perplexity is on its pretraining corpus, not the validation text of the table
    assert "perplexity on held-out text of its public pretraining corpus 4.5" in md
    loaded = load_report(tmp_path / "report.json")
    assert loaded["privacy"] == json.loads(json.dumps(privacy))
    assert loaded["schema_version"] == 2
    assert budget_violations(loaded) == []
    result = verify_run(tmp_path)
    assert result.ok, result.mismatches


def test_edited_epsilon_is_caught_by_schema_and_verify(tmp_path, ledger_run):
    tmp_path = _run_dir(tmp_path, ledger_run)
    report = _report(RUN_ID, ledger_run[1])
    bad = json.loads(json.dumps(report))
    bad["stages"]["rm"]["privacy"]["epsilon_spent"] *= 0.5
    with pytest.raises(ReportSchemaError, match=r"stages\.rm\.privacy\.epsilon_spent"):
        validate_report(bad)
    bad = json.loads(json.dumps(report))
    bad["privacy"]["epsilon"] *= 0.5
    (tmp_path / "report.json").write_text(json.dumps(bad))
    result = verify_run(tmp_path)
    assert not result.ok and any(m.startswith("epsilon:") for m in result.mismatches)


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda r: r.pop("run_id"), "report.run_id"),
        (lambda r: r.update(schema_version=1), "schema_version"),
        (lambda r: r["stages"]["rm"].update(privacy=None), r"stages\.rm\.privacy"),
        (lambda r: r["evaluation"]["policies"]["final"]["gold_reward"].update(lo=9.0), "gold_reward"),
        (lambda r: r["evaluation"]["policies"].update(dpo={}), "policies.dpo"),
        (lambda r: r["privacy"].update(run_id="other"), r"privacy\.run_id"),
        (lambda r: r["wall_time_s"].update(eval="slow"), r"wall_time_s\.eval"),
        (lambda r: r.pop("noise"), r"report\.noise"),
        (lambda r: r["noise"].update(secret=False), r"noise\.warning"),
        (lambda r: r["stages"]["sft"]["privacy"].pop("num_groups"), r"privacy\.num_groups"),
    ],
)
def test_schema_errors_name_the_field(ledger_run, mutate, where):
    report = _report(RUN_ID, json.loads(json.dumps(ledger_run[1])))
    validate_report(report)
    mutate(report)
    with pytest.raises(ReportSchemaError, match=where):
        validate_report(report)


def test_reproducible_noise_report_says_not_private_and_withheld_times(tmp_path, ledger_run):
    warning = "NOT PRIVATE: test"
    report = _report(RUN_ID, json.loads(json.dumps(ledger_run[1])),
                     noise={"secret": False, "secure_rng": False, "description": "reproducible", "warning": warning})
    write_report(report, report_json=tmp_path / "r.json", report_md=tmp_path / "r.md", plots_dir=tmp_path / "p")
    md = (tmp_path / "r.md").read_text()
    assert md.splitlines()[2].startswith("> **WARNING") and warning in md
    assert "Not published: the wall time of sft, rm" in md
    assert "σ_grad" in md and "σ_b (counts)" in md


def test_nonprivate_report_has_null_privacy(tmp_path):
    report = _report("run-4", None, preset="nonprivate")
    assert report["privacy"] is None and not any(s["private"] for s in report["stages"].values())
    paths = write_report(
        report, report_json=tmp_path / "r.json", report_md=tmp_path / "r.md", plots_dir=tmp_path / "p"
    )
    assert "no privacy guarantee" in (tmp_path / "r.md").read_text()
    assert "epsilon" in paths  # the series were given; a real nonprivate run passes none and gets no plot


def test_budget_violation_reported():
    report = {
        "stages": {"sft": {"privacy": {"epsilon_spent": 4.2, "target_epsilon": 4.0}}},
        "privacy": {"epsilon": 4.2, "target_epsilon": 4.0},
    }
    assert len(budget_violations(report)) == 2


def test_mean_ci95_matches_scipy():
    values = [0.3, -1.2, 2.5, 0.9, 1.1, -0.4, 0.0]
    mean, lo, hi = mean_ci95(values)
    ref_lo, ref_hi = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    assert mean == pytest.approx(sum(values) / len(values))
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi), rel=1e-12)
    assert mean_ci95([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="at least 2"):
        mean_ci95([1.0])


def test_series_from_metrics(tmp_path):
    from launch.pipeline.metrics import MetricsLogger, read_metrics
    from launch.pipeline.report import series_from_metrics

    with MetricsLogger(tmp_path / "tb", tmp_path / "m.jsonl") as m:
        for step in range(3):
            m.log("privacy/epsilon", 0.1 * step, step=step, stage="sft", private=False)
        m.log("privacy/epsilon", 0.5, step=0, stage="ppo", private=False)
        m.log("eval/gold_reward", 0.2, step=0, stage="ppo", private=False)
        m.log("eval/gold_reward", 0.4, step=1, stage="ppo", private=False)
        m.log("ppo/kl", 0.05, step=1, stage="ppo", private=True, released=True)
    got = series_from_metrics(read_metrics(tmp_path / "m.jsonl"))
    assert got["ppo"] == [
        {"iteration": 0, "gold_reward": 0.2, "kl": None},
        {"iteration": 1, "gold_reward": 0.4, "kl": 0.05},
    ]
    assert got["epsilon"] == {"ppo": [[0, 0.5]], "sft": [[0, 0.0], [1, 0.1], [2, 0.2]]}

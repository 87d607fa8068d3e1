"""`dpalign tune`: the study's accounting and its refusals (fast), and a real Ray Tune study end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import dp_accounting
import pytest
import yaml
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from accounting.accountants import coalesce, rdp_at_order
from accounting.events import PrivacyEvent
from accounting.ledger import BudgetExceededError, Ledger, LedgerError, compute_privacy, read_ledger
from accounting.tuning import sample_num_trials
from accounting.verify import verify_run
from launch.cli import main
from launch.config import ConfigError, load_config
from launch.schema import RunConfig
from launch.study import (
    StudyConfig,
    StudySection,
    check_study,
    compose_ledger,
    load_trial_config,
    plan_repeat_and_select,
    repeat_select_ledger,
)

REPO = Path(__file__).resolve().parents[2]
TUNE_TINY = str(REPO / "launch" / "configs" / "tune-tiny.yaml")


def _trial(root: Path, name: str, sigma: float) -> Path:
    run = root / name
    run.mkdir()
    with Ledger.open(run / "ledger.jsonl", run_id=name, target_epsilon=4.0, target_delta=1e-4) as ledger:
        for stage, q in (("sft", 0.1), ("rm", 0.2)):
            ledger.begin_stage(stage, user_fingerprint=f"sha256:{stage}", num_users=100)
            for step in range(5):
                ledger.record(PrivacyEvent(stage, step, "gradient", q, sigma))
            ledger.end_stage(stage)
    return run


def test_compose_ledger_is_the_composition_of_every_trial_event(tmp_path):
    trials = [_trial(tmp_path, "a", 1.0), _trial(tmp_path, "b", 1.5)]
    study = tmp_path / "study"
    study.mkdir()
    privacy = compose_ledger(trials, study / "ledger.jsonl", run_id="study")
    events = [e for d in trials for e in read_ledger(d / "ledger.jsonl").events]
    assert privacy["num_events"] == len(events) == 20 and privacy["composition"] == "sequential"
    acc = PLDAccountant()
    # every event of every trial, composed (the study publishes all of them); equal mechanisms are composed as one
    # count, which dp-accounting self-composes: the same epsilon (to 1e-8) in a fifth of the time
    for (q, sigma), count in Counter((e.sampling_rate, e.noise_multiplier) for e in events).items():
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count)
    assert privacy["delta"] == pytest.approx(2e-4)
    assert privacy["epsilon"] == pytest.approx(acc.get_epsilon(2e-4), rel=0.02)
    (study / "report.json").write_text(json.dumps({"privacy": privacy}))
    assert verify_run(study).ok  # `dpalign privacy verify STUDY_DIR`


ORDER, DELTA, TARGET = 8.0, 1e-3, 4.0


def _filtered_trial(root: Path, name: str, sigma: float, q: float = 0.2) -> Path:
    """A trial as the pipeline runs it under repeat_and_select: two user-disjoint stages under an RDP privacy filter
    at one order, each releasing until the filter refuses (the trial exhausts its budget)."""
    run = root / "trials" / name
    run.mkdir(parents=True)
    with Ledger.open(run / "ledger.jsonl", run_id=name, target_epsilon=TARGET, target_delta=DELTA,
                     accountant="rdp", rdp_order=ORDER, composition="parallel") as ledger:
        for stage in ("sft", "rm"):
            ledger.begin_stage(stage, user_fingerprint=f"sha256:{stage}", num_users=50)
            step = 0
            while True:
                try:
                    ledger.record(PrivacyEvent(stage, step, "gradient", q, sigma))
                except BudgetExceededError:
                    break
                step += 1
            ledger.end_stage(stage)
    return run


def _rs_study(tmp_path: Path, mean: float = 3.0, distribution: str = "truncated_negative_binomial",
              shape: float = 1.0) -> tuple[Path, dict, list[Path]]:
    study = StudySection(mode="repeat_and_select", mean_trials=mean, trial_distribution=distribution,
                         trial_shape=shape)
    base = load_config(RunConfig, str(REPO / "launch" / "configs" / "tiny.yaml"),
                       ["privacy.accountant=rdp", f"privacy.rdp_order={ORDER}", f"privacy.delta={DELTA}",
                        f"privacy.target_epsilon={TARGET}"])
    plan = plan_repeat_and_select(study, base)
    trials = [_filtered_trial(tmp_path, "t000", 1.5, q=0.1), _filtered_trial(tmp_path, "t001", 3.0, q=0.3)]
    out = tmp_path / "study"
    out.mkdir()
    privacy = repeat_select_ledger(plan, study, trials, out / "ledger.jsonl", run_id="study")
    (out / "report.json").write_text(json.dumps({"privacy": privacy}))
    return out, privacy, trials


@pytest.mark.parametrize("distribution,shape", [("truncated_negative_binomial", 1.0),
                                                ("truncated_negative_binomial", 0.0), ("poisson", 1.0)])
def test_repeat_and_select_epsilon_is_dp_accountings_repeat_and_select_over_the_trials(tmp_path, distribution, shape):
    out, privacy, trials = _rs_study(tmp_path, 3.0, distribution, shape)
    eta = float("inf") if distribution == "poisson" else shape

    def rs(event):
        acc = RdpAccountant(orders=[ORDER])
        acc.compose(dp_accounting.dp_event.RepeatAndSelectDpEvent(event, 3.0, eta))
        return acc.get_epsilon(DELTA)

    # The accounted mechanism is the tuning event's Gaussian: at the filter's order it is exactly the trials' budget
    tuning = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()
              if '"purpose":"tuning"' in line]
    assert len(tuning) == 1 and tuning[0]["stage"] == "tuning" and tuning[0]["mean_trials"] == 3.0
    bound = dp_accounting.GaussianDpEvent(tuning[0]["noise_multiplier"])
    single = RdpAccountant(orders=[ORDER])
    single.compose(bound)
    assert single.get_epsilon(DELTA) == pytest.approx(TARGET, rel=1e-9)
    assert privacy["epsilon"] == pytest.approx(rs(bound), rel=1e-12)
    assert privacy["composition"] == "repeat_and_select" and privacy["tuning"]["distribution"] == distribution
    # ... and it covers every recorded trial: each one's own RepeatAndSelectDpEvent (its realized events, the worse
    # of its two user-disjoint stages) is below, and the filter-exhausted trials sit just under the bound.
    for d in trials:
        contents = read_ledger(d / "ledger.jsonl")
        per_stage = [rs(dp_accounting.ComposedDpEvent([e.to_dp_event() for e in contents.events if e.stage == s]))
                     for s in contents.stages]
        assert max(per_stage) <= privacy["epsilon"] * (1 + 1e-12)
        rdp = [rdp_at_order(coalesce(e for e in contents.events if e.stage == s), order=ORDER) for s in contents.stages]
        assert 0.97 * privacy["tuning"]["trial_rdp_bound"] <= max(rdp) <= privacy["tuning"]["trial_rdp_bound"]
    # more than one trial costs more than one trial
    assert privacy["epsilon"] > TARGET
    assert privacy["num_events"] == 1 + sum(len(read_ledger(d / "ledger.jsonl").events) for d in trials)
    assert verify_run(out).ok


def test_repeat_and_select_ledger_refuses_tampering_and_a_trial_above_the_bound(tmp_path):
    out, privacy, _ = _rs_study(tmp_path)
    ledger = out / "ledger.jsonl"
    original = ledger.read_text()
    ledger.write_text(original.replace('"mean_trials":3.0', '"mean_trials":2.0'))  # a smaller E[K] claimed
    result = verify_run(out)
    assert not result.ok and any(m.startswith("epsilon") for m in result.mismatches)
    lines = original.splitlines(keepends=True)
    dropped = [ln for ln in lines if not ('"stage":"t1.rm"' in ln and '"step":0,' in ln)]
    ledger.write_text("".join(dropped))  # a trial's release removed: under-counting is caught
    assert not verify_run(out).ok
    extra = [ln for ln in lines if '"stage":"t0.sft"' in ln and '"type":"event"' in ln]
    at = max(i for i, ln in enumerate(lines) if '"stage":"t0.sft"' in ln and '"type":"event"' in ln)
    ledger.write_text("".join(lines[: at + 1] + extra * 2 + lines[at + 1:]))  # trial t0 beyond its filter
    with pytest.raises(LedgerError, match="per-trial bound"):
        compute_privacy(read_ledger(ledger))
    ledger.write_text(original.replace('"purpose":"tuning"', '"purpose":"other"'))
    with pytest.raises(LedgerError, match="exactly one tuning event"):
        compute_privacy(read_ledger(ledger))


def test_poisson_drawing_no_trial_releases_nothing_and_still_accounts_the_plan(tmp_path):
    from launch.study import DRAW_FILE, finish_study

    cfg = load_config(StudyConfig, TUNE_TINY, ["study.mode=repeat_and_select", "study.trial_distribution=poisson"])
    plan = plan_repeat_and_select(cfg.study, load_trial_config(cfg.study, [], proxy=False))
    out = tmp_path / "study"
    out.mkdir()
    (out / DRAW_FILE).write_text(json.dumps({"num_trials": 0, "params": []}))
    report = finish_study(cfg, out, [], plan=plan)
    assert report["best"] is None and report["release"] is None and not (out / "release").exists()
    assert not (out / "best.yaml").exists() and verify_run(out).ok
    assert report["privacy"]["epsilon"] == pytest.approx(plan["epsilon"], rel=1e-12)  # the promise made up front
    assert [e.purpose for e in read_ledger(out / "ledger.jsonl").events] == ["tuning"]


def test_number_of_trials_follows_its_law_and_is_secret():
    # inverse CDF at chosen points: geometric with mean 4 has P(K=1) = 1/4; Poisson(3) has P(K=0) = e^-3
    geo = {"distribution": "truncated_negative_binomial", "mean_trials": 4.0, "shape": 1.0}
    assert sample_num_trials(**geo, uniform=0.2499) == 1 and sample_num_trials(**geo, uniform=0.2501) == 2
    assert sample_num_trials(**geo, uniform=1 - 0.75 ** 5 - 1e-9) == 5
    pois = {"distribution": "poisson", "mean_trials": 3.0}
    assert sample_num_trials(**pois, uniform=0.0497) == 0 and sample_num_trials(**pois, uniform=0.0499) == 1
    # logarithmic (eta = 0) and eta = 2.5 keep their mean; OS-entropy draws (no seed) average to it
    for shape in (0.0, 2.5):
        draws = [sample_num_trials(distribution="truncated_negative_binomial", mean_trials=3.0, shape=shape)
                 for _ in range(6000)]
        assert min(draws) >= 1 and sum(draws) / len(draws) == pytest.approx(3.0, rel=0.08)
    assert sample_num_trials(distribution="truncated_negative_binomial", mean_trials=1.0, shape=1.0) == 1


@pytest.mark.parametrize("overrides,field", [
    (["study.scheduler=asha"], "study.scheduler"),
    (["study.scheduler=median_stopping"], "study.scheduler"),
    (["study.space={sft.lr: {grid: [0.01, 0.1]}}"], "study.space.sft.lr"),
    (["study.base_overrides=[ppo.rollout_actors=0]"], "privacy.accountant=rdp"),
    (["study.space={privacy.target_epsilon: {choice: [2, 4]}}"], "study.space.privacy.target_epsilon"),
    (["study.mean_trials=0.5"], "study.mean_trials"),
    (["study.base_overrides=[privacy.accountant=rdp, privacy.rdp_order=8, privacy.delta=1e-3, "
      "run.reproducible_noise=true]"], "run.reproducible_noise"),
])
def test_repeat_and_select_refusals_exit_2_before_any_trial_and_leave_no_study_dir(tmp_path, capsys, overrides,
                                                                                    field):
    study = tmp_path / "study"
    code = main(["tune", "--config", TUNE_TINY, "study.mode=repeat_and_select", f"study.dir={study}", *overrides])
    assert code == 2
    assert field in capsys.readouterr().err
    assert not study.exists()


def test_compose_refuses_a_scheduler_that_stops_trials_from_others_results(tmp_path, capsys):
    assert main(["tune", "--config", TUNE_TINY, "study.mode=compose", "study.scheduler=asha",
                 f"study.dir={tmp_path / 's'}"]) == 2
    assert "study.scheduler" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_unknown_search_field_and_adaptive_trials_under_compose_are_refused_before_any_trial():
    bad = load_config(StudyConfig, TUNE_TINY, ["study.space={sft.no_such_field: {choice: [1, 2]}}"])
    with pytest.raises(ConfigError, match="study.space.sft.no_such_field"):
        check_study(bad)
    adaptive = load_config(StudyConfig, TUNE_TINY, [
        "study.mode=compose", "study.base_overrides=[engine.policy=adaptive, privacy.accountant=rdp]"])
    with pytest.raises(ConfigError, match="study.mode=compose"):
        check_study(adaptive)


def test_tune_cli_help_config_and_config_errors_exit_2(capsys):
    assert main(["tune", "--help-config"]) == 0
    assert "study.mode" in capsys.readouterr().out
    assert main(["tune", "--config", TUNE_TINY, "study.num_samples=0"]) == 2
    assert "study.num_samples" in capsys.readouterr().err


@pytest.mark.heavy(47)
@pytest.mark.timeout(900)
def test_tiny_studies_in_all_three_modes_choose_release_and_account(tmp_path, ray_cluster):
    """>= 6 tiny trials under Ray Tune, in-process on the session's Ray, two at a time: public_proxy (2 proxy trials
    and the final private run), compose (3 private trials, all composed) and repeat_and_select (a secret K >= 1)."""
    from launch.study import DRAW_FILE, run_study

    def study(mode: str, *extra: str) -> tuple[Path, dict]:
        cfg = load_config(StudyConfig, TUNE_TINY, [f"study.mode={mode}", f"study.dir={tmp_path / mode}",
                                                   "study.num_samples=2", "study.max_concurrent=2", *extra])
        return tmp_path / mode, run_study(cfg, progress=False)

    # public_proxy: the trials saw only the proxy population; the study's only private events are the final run's
    out, rep = study("public_proxy")
    assert len(rep["trials"]) == 2 and all(r["status"] == "completed" for r in rep["trials"])
    for r in rep["trials"]:
        assert yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())["data"]["seed"] == 1001
    assert (out / "ledger.jsonl").read_bytes() == (out / "final" / "ledger.jsonl").read_bytes()
    assert yaml.safe_load((out / "final" / "config.yaml").read_text())["data"]["seed"] == 0
    assert verify_run(out).ok and rep["best"]["rm_accuracy"] == max(r["rm_accuracy"] for r in rep["trials"])
    assert load_config(RunConfig, str(out / "best.yaml")).data.seed == 0
    trials = 2

    # compose: every event of every trial, composed (PLD, dp-accounting's default discretization within 2%)
    out, rep = study("compose", "study.num_samples=3")
    events = [e for r in rep["trials"] for e in read_ledger(Path(r["run_dir"]) / "ledger.jsonl").events]
    acc = PLDAccountant()  # identical events self-composed (dp-accounting's own construct): 1 s, not 5 s
    counts = Counter(e.to_dp_event() for e in events)
    acc.compose(dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(ev, n) for ev, n in counts.items()]))
    assert rep["privacy"]["num_events"] == len(events) > 0
    assert rep["privacy"]["epsilon"] == pytest.approx(acc.get_epsilon(rep["privacy"]["delta"]), rel=0.02)
    assert verify_run(out).ok
    trials += len(rep["trials"])

    # repeat_and_select: K secret draws on the private data, only the winner under release/
    out, rep = study("repeat_and_select")
    k = json.loads((out / DRAW_FILE).read_text())["num_trials"]
    assert k >= 1 and len(rep["trials"]) == k and verify_run(out).ok
    contents = read_ledger(out / "ledger.jsonl")
    assert [e.purpose for e in contents.events].count("tuning") == 1
    assert {s.split(".")[0] for s in contents.stages} == {"tuning", *(f"t{i}" for i in range(k))}
    plan = rep["plan"]
    acc = RdpAccountant(orders=[plan["order"]])
    acc.compose(dp_accounting.dp_event.RepeatAndSelectDpEvent(
        dp_accounting.GaussianDpEvent(plan["trial_bound_sigma"]), 2.0, 1.0))
    assert rep["privacy"]["epsilon"] == pytest.approx(acc.get_epsilon(plan["delta"]), rel=1e-12)
    released = json.loads((out / "release" / "report.json").read_text())
    assert released["chosen"] == rep["best"]["overrides"] and released["study_epsilon"] == rep["privacy"]["epsilon"]
    assert "trials" not in released and (out / "release" / "run" / "stages" / "ppo").is_dir()
    assert (out / "release" / "run" / "report.json").read_text() == (
        Path(rep["best"]["run_dir"]) / "report.json").read_text()
    trials += k
    assert trials >= 6


@pytest.mark.slow  # ~90 s: 6 public-proxy trials under Ray Tune and the final private run
@pytest.mark.timeout(900)
def test_public_proxy_study_runs_chooses_and_its_ledger_is_the_final_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "tune", "--config", TUNE_TINY,
                           f"study.dir={tmp_path / 'study'}", "--json"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    study = Path(summary["study_dir"])
    rows = [json.loads(line) for line in (study / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["status"] == "completed" for r in rows)
    for r in rows:  # every trial saw the public proxy population, never the private data
        assert yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())["data"]["seed"] == 1001
    final = study / "final"
    assert (study / "ledger.jsonl").read_bytes() == (final / "ledger.jsonl").read_bytes()  # no other private event
    assert verify_run(study).ok and verify_run(final).ok
    best = load_config(RunConfig, str(study / "best.yaml"))
    assert best.data.seed == 0  # the chosen configuration, on the private data
    assert summary["best_rm_accuracy"] == max(r["rm_accuracy"] for r in rows)


def _events_per_trial(study: Path) -> dict[str, int]:
    out = {}
    for d in sorted((study / "trials").iterdir()):
        if (d / "ledger.jsonl").is_file():
            out[d.name] = sum(1 for ln in (d / "ledger.jsonl").read_text().splitlines() if '"type":"event"' in ln)
    return out


def _group_pids(pgid: int) -> list[int]:
    ps = subprocess.run(["ps", "-e", "-o", "pid=,pgid="], capture_output=True, text=True).stdout.split("\n")
    return [int(a) for a, b in (ln.split() for ln in ps if ln.strip()) if int(b) == pgid]


@pytest.mark.slow  # ~3 min: a repeat_and_select study killed mid-trial, then resumed to the end
@pytest.mark.timeout(1200)
def test_killed_study_resumes_and_its_ledger_never_under_counts(tmp_path):
    import os
    import signal
    import time

    study = tmp_path / "study"
    cmd = [sys.executable, "-m", "launch.cli", "tune", "--config", TUNE_TINY, "study.mode=repeat_and_select",
           "study.mean_trials=3", f"study.dir={study}", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: Ray and Tune workers included
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:  # mid-way: a trial has released something
            if (study / "trials").is_dir() and any(_events_per_trial(study).values()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the study finished before it could be killed"
        draw = (study / "tuning_draw.json").read_text()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        for pid in _group_pids(proc.pid):  # whatever of that group outlived the kill (by pid, never by name)
            os.kill(pid, signal.SIGKILL)
    before = _events_per_trial(study)
    assert not (study / "report.json").exists()
    done = subprocess.run([sys.executable, "-m", "launch.cli", "tune", "--resume", str(study), "--json",
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (study / "tuning_draw.json").read_text() == draw  # K and the configurations were never drawn again
    k = json.loads(draw)["num_trials"]
    assert verify_run(study).ok
    contents = read_ledger(study / "ledger.jsonl")
    trials = sorted({s.split(".")[0] for s in contents.stages if s != "tuning"})
    assert len(trials) == k == len(_events_per_trial(study))
    for i, (name, count) in enumerate(sorted(before.items())):  # every release made before the crash is counted
        assert sum(1 for e in contents.events if e.stage.startswith(f"t{i}.")) >= count, name
    assert json.loads((study / "release" / "report.json").read_text())["study_epsilon"] == pytest.approx(
        compute_privacy(contents)["epsilon"])

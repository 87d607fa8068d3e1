"""`dpalign tune`: a Ray Tune study of how to spend a private pipeline's budget, with the study's own cost accounted.

A study runs full pipeline trials (each one `dpalign run` in a Ray Tune trial with its own resources), scores each
on PUBLIC held-out data only, and writes one study directory:

    STUDY_DIR/study.yaml        the study config that ran
    STUDY_DIR/trials/<id>/      each trial's own run directory (ledger, report, models)
    STUDY_DIR/results.jsonl     one row per trial: its overrides, public metrics and epsilon
    STUDY_DIR/best.yaml         the chosen configuration, runnable with `dpalign run --config`
    STUDY_DIR/ledger.jsonl      the study's privacy ledger; `dpalign privacy verify STUDY_DIR` recomputes it
    STUDY_DIR/report.json, report.md, plots/

Privacy modes (what the study publishes and what it costs):

* ``public_proxy`` (default): every trial runs on a PUBLIC proxy population (``study.proxy_overrides``: on the
  embedded task, the generator with another seed -- other users, same N and schedule; with your own data, public
  files of the same shape). Choosing among them touches no private data, so the search costs nothing; the chosen
  configuration then runs ONCE on the private data ("final/"), and the study ledger is that run's ledger.
* ``compose``: every trial runs on the private data and every trial is published (the epsilon sweep a paper
  reports). The study ledger holds every event of every trial, composed SEQUENTIALLY (an over-count: a trial's
  user-disjoint stages could compose in parallel), so the study's epsilon is at least the sum-like composition
  of all trials. Trials that adapt sigma (the learned controller, adaptive clipping) are refused here: composing
  their realized events with PLD is not valid under adaptivity.

Choosing the best of several PRIVATE trials and publishing only it (Papernot & Steinke 2022, repeat-and-select
with a random number of trials) is not offered yet: `accounting/tuning.py` has its accounting, but a study that
releases only the winner must also withhold every other trial's outputs, which this module does not do.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from launch.config import ConfigError, require

MODES = ("public_proxy", "compose")
METRICS = ("final_gold_reward", "gain_over_sft", "rm_accuracy")


@dataclass
class StudySection:
    """What to search, how, and under which privacy mode."""

    name: str = "study"
    """Study name; the study directory is <out_dir>/<name>-<timestamp> unless study.dir is set."""
    out_dir: str = "studies"
    """Parent directory of study directories."""
    dir: str = ""
    """Exact study directory (empty: derived from out_dir, name and the start time)."""
    mode: Literal["public_proxy", "compose"] = "public_proxy"
    """public_proxy: trials on a public proxy population, the chosen config run once on the private data (tuning
    costs nothing). compose: trials on the private data, all published, all composed on the study ledger."""
    base_config: str = "launch/configs/tiny.yaml"
    """The run config every trial starts from (a `dpalign run` YAML)."""
    base_overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to the base config in every trial and in the final run."""
    proxy_overrides: list[str] = field(default_factory=lambda: ["data.seed=1001"])
    """public_proxy: overrides that turn the private data into a public proxy population of the same size and
    schedule (the embedded task: the generator with another seed; your own data: data.*_path=public files)."""
    space: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Search space: dotted run-config field -> one of {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]},
    {loguniform: [lo, hi]}, {randint: [lo, hi]}. E.g. data.sft_user_fraction: {choice: [0.3, 0.4, 0.5]}."""
    metric: Literal["final_gold_reward", "gain_over_sft", "rm_accuracy"] = "final_gold_reward"
    """What to maximize, always on PUBLIC held-out data: the final policy's mean gold reward on the public eval
    prompts, its gain over the SFT policy, or the reward model's accuracy on public gold pairs."""
    num_samples: int = 6
    """Trials (with grid entries: repeats of the grid)."""
    seed: int = 0
    """Seed of the search (which configurations are tried; public)."""
    trial_cpus: float = 1.0
    """CPUs reserved per trial (tune.with_resources). A trial with ray.num_workers >= 1 also needs its learners'."""
    max_concurrent: int = 1
    """Trials at a time (1 on a 2-core machine)."""

    def check(self) -> None:
        require(bool(self.name.strip()), "study.name", "must be a non-empty string")
        require(self.num_samples >= 1, "study.num_samples", "must be >= 1")
        require(self.trial_cpus > 0, "study.trial_cpus", "must be > 0")
        require(self.max_concurrent >= 1, "study.max_concurrent", "must be >= 1")
        require(bool(self.space), "study.space", "must name at least one run-config field to search")
        for key, spec in self.space.items():
            require(isinstance(spec, dict) and len(spec) == 1, f"study.space.{key}",
                    "must be one of {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, "
                    "{randint: [lo, hi]}")
            kind, values = next(iter(spec.items()))
            require(kind in ("choice", "grid", "uniform", "loguniform", "randint"), f"study.space.{key}",
                    f"unknown kind {kind!r}")
            require(isinstance(values, list) and len(values) >= (1 if kind in ("choice", "grid") else 2),
                    f"study.space.{key}.{kind}", "needs a list (two bounds for a range)")
        if self.mode == "public_proxy":
            require(bool(self.proxy_overrides), "study.proxy_overrides",
                    "public_proxy needs the overrides that make the trials' data a public proxy")


@dataclass
class StudyConfig:
    """Everything one `dpalign tune` needs."""

    study: StudySection = field(default_factory=StudySection)
    """The study: base config, search space, privacy mode, trials."""

    def check(self) -> None:
        self.study.check()


# ---- trials ----------------------------------------------------------------------------------------------------


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """A Tune trial's sampled parameters as dotted `key=value` overrides."""
    return [f"{k}={json.dumps(v) if isinstance(v, str | list) else v}" for k, v in sorted(params.items())]


def load_trial_config(study: StudySection, overrides: list[str], *, proxy: bool, base: Path | None = None) -> Any:
    """The run config of one trial (or of the final run): base + base overrides [+ proxy] + the trial's, with
    relative paths resolved against ``base`` (the directory `dpalign tune` ran in; a Tune worker's working
    directory is its trial's, not the user's)."""
    from launch.config import load_config
    from launch.paths import absolute, resolve_config_paths
    from launch.schema import RunConfig

    base = Path.cwd() if base is None else Path(base)
    extra = [*study.base_overrides, *(study.proxy_overrides if proxy else []), *overrides]
    return resolve_config_paths(load_config(RunConfig, absolute(study.base_config, base), extra), base=base)


def check_study(cfg: StudyConfig) -> None:
    """Refuse before any trial: every searched field must exist and accept its values; compose refuses trials
    that adapt sigma. Raises ConfigError naming the field."""
    study = cfg.study
    for key, spec in study.space.items():
        _, values = next(iter(spec.items()))  # a choice's first value, or a range's lower bound
        try:
            load_trial_config(study, trial_overrides({key: values[0]}), proxy=study.mode == "public_proxy")
        except ConfigError as err:
            raise ConfigError(f"study.space.{key}: {err}") from None
    base = load_trial_config(study, [], proxy=False)
    if study.mode == "compose" and (base.controller.enabled or base.engine.policy == "adaptive"):
        raise ConfigError(
            "study.mode=compose: trials that choose sigma adaptively (controller.enabled, engine.policy=adaptive) "
            "cannot be composed after the fact with PLD; use study.mode=public_proxy"
        )


def _search_space(space: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            out[key] = tune.choice(values)
        elif kind == "grid":
            out[key] = tune.grid_search(values)
        elif kind == "uniform":
            out[key] = tune.uniform(float(values[0]), float(values[1]))
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(values[0]), float(values[1]))
        else:
            out[key] = tune.randint(int(values[0]), int(values[1]) + 1)
    return out


def public_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The trial's public numbers from its report (public eval prompts, public gold pairs, the ledger's epsilon)."""
    pols = report["evaluation"]["policies"]
    final, sft = pols["final"]["gold_reward"]["mean"], pols["sft"]["gold_reward"]["mean"]
    rm = report["evaluation"].get("reward_model") or {}
    return {
        "final_gold_reward": final,
        "gain_over_sft": final - sft,
        "rm_accuracy": rm.get("accuracy", float("nan")),
        "epsilon": (report.get("privacy") or {}).get("epsilon", 0.0),
        "status": report["status"],
    }


def _trainable(params: dict[str, Any], *, study_fields: dict[str, Any], cwd: str) -> None:
    """One Tune trial: a full pipeline run in this worker process, reporting its public metrics once."""
    from ray import tune

    from launch.pipeline.pipeline import run_pipeline

    ctx = tune.get_context()
    study = StudySection(**study_fields)
    overrides = trial_overrides(params)
    cfg = load_trial_config(study, overrides, proxy=study.mode == "public_proxy", base=Path(cwd))
    run_dir = Path(study.dir) / "trials" / ctx.get_trial_id()
    cfg.run.dir = str(run_dir)
    if run_dir.is_dir() and (run_dir / "report.json").is_file():  # a restored study: this trial finished
        report = json.loads((run_dir / "report.json").read_text())
    else:
        report = run_pipeline(cfg, resume=str(run_dir) if (run_dir / "config.yaml").is_file() else None,
                              progress=False)
    tune.report({**public_metrics(report), "overrides": overrides, "run_dir": str(run_dir)})


# ---- the study -------------------------------------------------------------------------------------------------


def study_dir_for(study: StudySection) -> Path:
    if study.dir:
        return Path(study.dir)
    return Path(study.out_dir) / f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_study(cfg: StudyConfig, *, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or, with ``resume``, finish) a study; returns its report (also written to the study directory)."""
    import yaml
    from ray import tune

    from cluster.runtime import init_ray, shutdown_ray
    from launch.config import dump_yaml

    study = cfg.study
    check_study(cfg)
    study.base_config = str(Path(study.base_config).resolve())
    out = Path(resume) if resume else study_dir_for(study)
    study.dir = str(out.resolve())
    out = Path(study.dir)
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"study.dir={out} exists and is not empty; use --resume {out} to finish it")
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "study.yaml")
    rt = init_ray()
    try:
        fields = yaml.safe_load(yaml.safe_dump({k: getattr(study, k) for k in StudySection.__dataclass_fields__}))
        trainable = tune.with_resources(tune.with_parameters(_trainable, study_fields=fields, cwd=str(Path.cwd())),
                                        {"cpu": study.trial_cpus})
        storage = str(out / "ray_tune")
        if resume and tune.Tuner.can_restore(str(Path(storage) / "study")):
            tuner = tune.Tuner.restore(str(Path(storage) / "study"), trainable=trainable, resume_errored=True)
        else:
            from ray.tune.search import BasicVariantGenerator

            tuner = tune.Tuner(
                trainable,
                param_space=_search_space(study.space),
                tune_config=tune.TuneConfig(
                    metric=study.metric, mode="max", num_samples=study.num_samples,
                    max_concurrent_trials=study.max_concurrent,
                    search_alg=BasicVariantGenerator(random_state=study.seed),
                ),
                run_config=tune.RunConfig(name="study", storage_path=storage),
            )
        grid = tuner.fit()
    finally:
        if rt.started_here:
            shutdown_ray()
    rows = []
    for result in grid:
        if result.error is not None or not result.metrics or "overrides" not in result.metrics:
            raise RuntimeError(f"trial {result.path} failed: {result.error}")
        m = result.metrics
        rows.append({k: m[k] for k in ("overrides", "run_dir", "status", "epsilon", *METRICS)})
    rows.sort(key=lambda r: r["run_dir"])
    return finish_study(cfg, out, rows)


def finish_study(cfg: StudyConfig, out: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Choose, run the final (public_proxy), build the study ledger, write results, best.yaml and the report."""
    from launch.config import dump_yaml

    study = cfg.study
    scored = [r for r in rows if r["status"] == "completed" and not math.isnan(r[study.metric])]
    if not scored:
        raise RuntimeError("no trial completed with a finite metric; see the trials' reports")
    best = max(scored, key=lambda r: r[study.metric])
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best_cfg = load_trial_config(study, best["overrides"], proxy=False)
    best_cfg.run.dir = ""
    best_cfg.run.name = f"{study.name}-best"
    dump_yaml(best_cfg, out / "best.yaml")
    final = None
    if study.mode == "public_proxy":
        final = _final_run(study, best["overrides"], out)
        shutil.copyfile(Path(final["_run_dir"]) / "ledger.jsonl", out / "ledger.jsonl")
        from accounting.ledger import compute_privacy, read_ledger

        privacy = compute_privacy(read_ledger(out / "ledger.jsonl"))
    else:
        privacy = compose_ledger([Path(r["run_dir"]) for r in rows], out / "ledger.jsonl", run_id=out.name)
    report = {
        "schema": "dpalign.study",
        "study": out.name,
        "mode": study.mode,
        "metric": study.metric,
        "trials": rows,
        "best": best,
        "final": public_metrics(final) | {"run_dir": final["_run_dir"]} if final is not None else None,
        "privacy": privacy,
        "tuning_cost": "0: trials saw only public proxy data" if study.mode == "public_proxy"
        else "every trial composed sequentially on the study ledger",
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    _write_markdown(report, out)
    return report


def _final_run(study: StudySection, overrides: list[str], out: Path) -> dict[str, Any]:
    """public_proxy: the chosen configuration, once, on the private data (its ledger is the study's)."""
    from launch.pipeline.pipeline import run_pipeline

    run_dir = out / "final"
    cfg = load_trial_config(study, overrides, proxy=False)
    cfg.run.dir = str(run_dir)
    if (run_dir / "report.json").is_file():
        report = json.loads((run_dir / "report.json").read_text())
        report["_run_dir"] = str(run_dir)
        return report
    return run_pipeline(cfg, resume=str(run_dir) if (run_dir / "config.yaml").is_file() else None, progress=False)


def compose_ledger(run_dirs: list[Path], path: Path, *, run_id: str) -> dict[str, Any]:
    """compose: one ledger with every event of every trial, composed sequentially (stages renamed
    ``t<i>.<stage>``); returns its privacy report (what `dpalign privacy verify STUDY_DIR` recomputes)."""
    from accounting.events import PrivacyEvent
    from accounting.ledger import Ledger, read_ledger

    trials = [read_ledger(d / "ledger.jsonl") for d in run_dirs if (d / "ledger.jsonl").is_file()]
    target = sum(t.run.target_epsilon for t in trials) or 1.0
    delta = min(0.5, sum(t.run.target_delta for t in trials)) or 1e-9
    path.unlink(missing_ok=True)
    with Ledger.open(path, run_id=run_id, target_epsilon=target, target_delta=delta, accountant="pld",
                     composition="sequential") as ledger:
        for i, contents in enumerate(trials):
            for name, header in contents.stages.items():
                stage = f"t{i}.{name}"
                ledger.begin_stage(stage, user_fingerprint=header.user_fingerprint, num_users=header.num_users,
                                   target_epsilon=target, target_delta=delta)
                for e in contents.events:
                    if e.stage == name:
                        ledger.record(PrivacyEvent(stage, e.step, e.purpose, e.sampling_rate, e.noise_multiplier,
                                                   e.repeats), enforce=False)
                ledger.end_stage(stage)
        return ledger.report()


def _write_markdown(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    metric = report["metric"]
    rows = report["trials"]
    (out / "plots").mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter([r["epsilon"] for r in rows], [r[metric] for r in rows], label="trials")
    b = report["best"]
    ax.scatter([b["epsilon"]], [b[metric]], marker="*", s=200, label="chosen")
    ax.set_xlabel("trial epsilon" + (" (public proxy: not private)" if report["mode"] == "public_proxy" else ""))
    ax.set_ylabel(f"{metric} (public held-out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plots" / "trials.png", dpi=100)
    plt.close(fig)
    privacy = report["privacy"]
    lines = [
        f"# dpalign study {report['study']}", "",
        f"Mode **{report['mode']}**; objective **{metric}** on public held-out data only.", "",
        f"Study privacy: ε = {privacy['epsilon']:.4g} at δ = {privacy['delta']:.3g} ({privacy['accountant']}, "
        f"{privacy['composition']}); tuning cost: {report['tuning_cost']}. Verify with "
        "`dpalign privacy verify STUDY_DIR`.", "",
        "| trial | overrides | status | ε | final gold | gain over SFT | RM accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {Path(r['run_dir']).name} | {' '.join(r['overrides'])} | {r['status']} | {r['epsilon']:.3g} | "
                     f"{r['final_gold_reward']:+.3f} | {r['gain_over_sft']:+.3f} | {r['rm_accuracy']:.3f} |")
    if report["mode"] == "public_proxy":
        lines += ["", "The trials ran on a public proxy population: their ε is what each configuration costs on the "
                  "private data, not a cost of the study. Only the final run below touched private data."]
    lines += ["", f"Chosen: `{' '.join(b['overrides'])}` -> `best.yaml` (`dpalign run --config best.yaml`)."]
    if report["final"] is not None:
        f = report["final"]
        lines += [f"Final private run ({f['run_dir']}): ε = {f['epsilon']:.4g}, final gold {f['final_gold_reward']:+.3f}, "
                  f"gain over SFT {f['gain_over_sft']:+.3f}."]
    lines += ["", "![trials](plots/trials.png)", ""]
    (out / "report.md").write_text("\n".join(lines))

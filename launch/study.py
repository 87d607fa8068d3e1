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
* ``repeat_and_select``: a secret random number K of trials (drawn once from OS entropy, kept in
  ``tuning_draw.json`` for resume) run on the private data, each under an RDP privacy filter whose budget the base
  config fixes; only the best is released, under ``release/``. Every configuration the search can draw is then
  (order, bound)-RDP, and releasing the best of K costs dp-accounting's ``RepeatAndSelectDpEvent`` over that
  bound (Papernot & Steinke 2022, Thm 2 / Thm 6), known before any trial. The study ledger holds a ``tuning`` event
  and every trial's events. Everything outside ``release/`` is the operator's private record.
* ``compose``: every trial runs on the private data and every trial is published (the epsilon sweep a paper
  reports). The study ledger holds every event of every trial, composed SEQUENTIALLY (an over-count: a trial's
  user-disjoint stages could compose in parallel), so the study's epsilon is at least the sum-like composition
  of all trials. Trials that adapt sigma (the learned controller, adaptive clipping) are refused here: composing
  their realized events with PLD is not valid under adaptivity.

The theorems, costs and which mode to use when: docs/tuning.md.
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

MODES = ("public_proxy", "repeat_and_select", "compose")
SCHEDULERS = ("fifo", "asha", "median_stopping")
DRAW_FILE = "tuning_draw.json"
"""repeat_and_select: the secret number of trials and their configurations, drawn once before any trial and kept
with the study (never published: the theorem needs K hidden), so a resumed study never draws again."""
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
    mode: Literal["public_proxy", "repeat_and_select", "compose"] = "public_proxy"
    """public_proxy: trials on a public proxy population, the chosen config run once on the private data (tuning
    costs nothing). repeat_and_select: a secret random number of trials on the private data, only the best one
    released (Papernot & Steinke; needs privacy.accountant=rdp, privacy.rdp_order and privacy.delta set). compose:
    trials on the private data, all published, all composed on the study ledger."""
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
    """Trials (with grid entries: repeats of the grid). Not used by repeat_and_select, whose number of trials is
    drawn at random (study.mean_trials)."""
    mean_trials: float = 3.0
    """repeat_and_select: E[K], the mean of the secret random number of trials (>= 1)."""
    trial_distribution: Literal["truncated_negative_binomial", "poisson"] = "truncated_negative_binomial"
    """repeat_and_select: the law of K (Papernot & Steinke Thm 2 or Thm 6). Poisson may draw K = 0 (nothing
    released)."""
    trial_shape: float = 1.0
    """repeat_and_select, truncated_negative_binomial: its shape eta >= 0 (1: geometric, 0: logarithmic)."""
    target_epsilon: float = 0.0
    """repeat_and_select: the whole study's epsilon (at privacy.delta). > 0: each trial's privacy.target_epsilon is
    set, before any trial, to the largest value whose repeat-and-select cost stays within it. 0: the trials keep the
    base config's privacy.target_epsilon and the study costs what the plan says."""
    scheduler: Literal["fifo", "asha", "median_stopping"] = "fifo"
    """Tune trial scheduler. asha/median_stopping stop a trial from other trials' results: allowed only under
    public_proxy (public data); refused for trials on private data (see launch/study.py)."""
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
        if self.mode != "public_proxy":
            # repeat_and_select: Papernot & Steinke repeat ONE mechanism K times independently; a scheduler that
            # stops or reshapes a trial from another's results couples the trials and the theorem no longer
            # applies. compose: the ledger composes the events that ran, which is valid only when each trial's
            # schedule was fixed before it started, not cut short from other trials' released results.
            require(self.scheduler == "fifo", "study.scheduler",
                    f"{self.scheduler} makes one trial depend on another's results, which study.mode={self.mode} "
                    "cannot account (repeat_and_select needs independent repetitions); use study.scheduler=fifo, "
                    "or study.mode=public_proxy")
        if self.mode == "repeat_and_select":
            require(self.mean_trials >= 1.0 and math.isfinite(self.mean_trials), "study.mean_trials",
                    "must be a finite number >= 1")
            require(self.trial_shape >= 0.0 and math.isfinite(self.trial_shape), "study.trial_shape",
                    "must be a finite number >= 0")
            require(self.target_epsilon >= 0.0 and math.isfinite(self.target_epsilon), "study.target_epsilon",
                    "must be a finite number >= 0 (0: the trials keep privacy.target_epsilon)")
            for key, spec in self.space.items():
                require(next(iter(spec)) != "grid", f"study.space.{key}",
                        "repeat_and_select draws each trial's configuration independently at random; a grid is "
                        "not a random draw: use {choice: [...]}")


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
    if base.run.reproducible_noise and base.privacy.private_stages:
        raise ConfigError("run.reproducible_noise=true keys the noise by the public seed: no run of this study would "
                          "be private, so the study could not claim its epsilon; drop it from study.base_overrides")
    if study.mode == "repeat_and_select":
        _check_repeat_and_select(study, base)
    if study.mode == "compose" and (base.controller.enabled or base.engine.policy == "adaptive"):
        raise ConfigError(
            "study.mode=compose: trials that choose sigma adaptively (controller.enabled, engine.policy=adaptive) "
            "cannot be composed after the fact with PLD; use study.mode=public_proxy"
        )


def _check_repeat_and_select(study: StudySection, base: Any) -> None:
    """repeat_and_select bounds every trial by its RDP privacy filter (``accounting.tuning.trial_rdp_bound``), so the
    filter's budget must be fixed by the base config and the same for every configuration the search can draw."""
    privacy = base.privacy
    if not privacy.private_stages:
        raise ConfigError("study.mode=repeat_and_select: the base config has no private stage; there is nothing to "
                          "account (use study.mode=public_proxy)")
    missing = [f for f, ok in (("privacy.accountant=rdp", privacy.accountant == "rdp"),
                               ("privacy.rdp_order=<order>", privacy.rdp_order is not None),
                               ("privacy.delta=<delta>", privacy.delta is not None)) if not ok]
    if missing:
        raise ConfigError(
            "study.mode=repeat_and_select bounds each trial by an RDP privacy filter whose budget the config fixes "
            f"before any trial; add {' '.join(missing)} to study.base_overrides (e.g. privacy.accountant=rdp "
            "privacy.rdp_order=8 privacy.delta=1e-5)"
        )
    for key in study.space:
        if key.startswith("privacy."):
            raise ConfigError(
                f"study.space.{key}: repeat_and_select cannot search the privacy budget itself (every trial must "
                "share one filter budget); search the data split and training hyper-parameters, or use "
                "study.mode=compose"
            )


def plan_repeat_and_select(study: StudySection, base: Any) -> dict[str, Any]:
    """The study's cost, known before any trial: every trial is (order, bound)-RDP by its filter, and releasing
    the best of K ~ law(mean_trials) of them costs RepeatAndSelectDpEvent at that order (accounting/tuning.py).

    With ``study.target_epsilon`` the trials' target is the largest (to 1e-4 relative, found by bisection) whose
    study cost is within it; ``base`` is then updated and the caller adds it to every trial's overrides."""
    from accounting.tuning import bound_event, repeat_and_select_epsilon, trial_rdp_bound

    privacy = base.privacy
    order, delta = float(privacy.rdp_order), float(privacy.delta)

    def cost(trial_target: float) -> tuple[float, float, Any]:
        bound = trial_rdp_bound(target_epsilon=trial_target, delta=delta, order=order)
        event = bound_event(rdp_bound=bound, order=order)
        eps = repeat_and_select_epsilon(trial=event, order=order, mean_trials=study.mean_trials,
                                        distribution=study.trial_distribution, shape=study.trial_shape, delta=delta)
        return eps, bound, event

    trial_target = float(privacy.target_epsilon)
    if study.target_epsilon > 0:
        lo, hi = 0.0, float(study.target_epsilon)  # a trial never costs more than the study that repeats it
        while hi - lo > 1e-4 * hi:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cost(mid)[0] <= study.target_epsilon else (lo, mid)
        if lo <= 0.0:
            raise ConfigError(f"study.target_epsilon={study.target_epsilon:g}: no trial budget fits it at "
                              f"privacy.rdp_order={order:g}, privacy.delta={delta:g}; raise it or lower "
                              "study.mean_trials")
        trial_target = lo
    eps, bound, event = cost(trial_target)
    return {"order": order, "delta": delta, "trial_target_epsilon": trial_target,
            "trial_rdp_bound": bound, "trial_bound_sigma": event.noise_multiplier, "epsilon": eps}


def draw_trials(study: StudySection, out: Path) -> dict[str, Any]:
    """repeat_and_select: draw K and the K configurations from OS entropy, once, and keep them (fsynced) in the
    study directory before any trial runs; a resumed study reads them back and never draws again."""
    import os
    import secrets

    import numpy as np

    path = out / DRAW_FILE
    if path.is_file():
        return json.loads(path.read_text())
    from accounting.tuning import sample_num_trials

    k = sample_num_trials(distribution=study.trial_distribution, mean_trials=study.mean_trials,
                          shape=study.trial_shape)
    rng = np.random.RandomState(secrets.randbits(32))  # secret: a public seed would tie the winner to its index
    space = _search_space(study.space)
    params = [{key: _plain(dom.sample(random_state=rng)) for key, dom in sorted(space.items())} for _ in range(k)]
    draw = {"num_trials": k, "params": params}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(draw) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return draw


def _plain(value: Any) -> Any:
    """A numpy scalar from Tune's sampler as a plain Python number (for YAML overrides and JSON)."""
    return value.item() if hasattr(value, "item") else value


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


def _trainable(params: dict[str, Any], *, study_fields: dict[str, Any], cwd: str,
               drawn: list[dict[str, Any]] | None = None) -> None:
    """One Tune trial: a full pipeline run in this worker process, reporting its public metrics once.

    repeat_and_select trials get only an index into the secret draw (``drawn``) and run in ``trials/t<index>``, so
    a restored study finds the same trial in the same directory and resumes or reuses it, never running another.
    """
    from ray import tune

    from dpalign.allocator import keep_freed_memory
    from launch.pipeline.pipeline import run_pipeline

    keep_freed_memory()  # a trial on a cluster node did not inherit the driver's setting
    study = StudySection(**study_fields)
    if drawn is not None:
        index = int(params["_trial"])
        overrides = trial_overrides(drawn[index])
        run_dir = Path(study.dir) / "trials" / f"t{index:03d}"
    else:
        overrides = trial_overrides(params)
        run_dir = Path(study.dir) / "trials" / tune.get_context().get_trial_id()
    cfg = load_trial_config(study, overrides, proxy=study.mode == "public_proxy", base=Path(cwd))
    cfg.run.dir = str(run_dir)
    if run_dir.is_dir() and (run_dir / "report.json").is_file():  # a restored study: this trial finished
        report = json.loads((run_dir / "report.json").read_text())
    else:
        report = run_pipeline(cfg, resume=str(run_dir) if (run_dir / "config.yaml").is_file() else None,
                              progress=False)
    tune.report({**public_metrics(report), "overrides": overrides, "run_dir": str(run_dir)})


def _scheduler(name: str) -> Any:
    if name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler()
    if name == "median_stopping":
        from ray.tune.schedulers import MedianStoppingRule

        return MedianStoppingRule()
    return None


# ---- the study -------------------------------------------------------------------------------------------------


def study_dir_for(study: StudySection) -> Path:
    if study.dir:
        return Path(study.dir)
    return Path(study.out_dir) / f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_study(cfg: StudyConfig, *, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or, with ``resume``, finish) a study; returns its report (also written to the study directory).

    Every refusal (ConfigError) comes before the study directory exists and before any trial."""
    import yaml
    from ray import tune

    from cluster.runtime import init_ray, shutdown_ray
    from launch.config import dump_yaml

    study = cfg.study
    check_study(cfg)
    plan = None
    if study.mode == "repeat_and_select":
        plan = plan_repeat_and_select(study, load_trial_config(study, [], proxy=False))
        if study.target_epsilon > 0:  # every trial (and best.yaml) runs at the budget the plan found
            study.base_overrides = [*study.base_overrides,
                                    f"privacy.target_epsilon={plan['trial_target_epsilon']!r}"]
    study.base_config = str(Path(study.base_config).resolve())
    out = Path(resume) if resume else study_dir_for(study)
    study.dir = str(out.resolve())
    out = Path(study.dir)
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"study.dir={out} exists and is not empty; use --resume {out} to finish it")
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "study.yaml")
    drawn = None
    if plan is not None:
        drawn = draw_trials(study, out)["params"]
        if progress:
            print(f"dpalign tune: repeat_and_select: each trial is ({plan['order']:g}, {plan['trial_rdp_bound']:.4g})"
                  f"-RDP by its filter; releasing the best of a secret random number of trials (mean "
                  f"{study.mean_trials:g}, {study.trial_distribution}) costs epsilon {plan['epsilon']:.4g} at delta "
                  f"{plan['delta']:g}", flush=True)
    if drawn is not None and not drawn:
        return finish_study(cfg, out, [], plan=plan)  # Poisson drew K = 0: no trial, nothing released
    rt = init_ray()
    try:
        fields = yaml.safe_load(yaml.safe_dump({k: getattr(study, k) for k in StudySection.__dataclass_fields__}))
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, study_fields=fields, cwd=str(Path.cwd()), drawn=drawn),
            {"cpu": study.trial_cpus},
        )
        storage = str(out / "ray_tune")
        if resume and tune.Tuner.can_restore(str(Path(storage) / "study")):
            tuner = tune.Tuner.restore(str(Path(storage) / "study"), trainable=trainable, resume_errored=True)
        else:
            from ray.tune.search import BasicVariantGenerator

            if drawn is not None:  # the K secret configurations, by index (see _trainable)
                space, samples, search = {"_trial": tune.grid_search(list(range(len(drawn))))}, 1, None
            else:
                space, samples = _search_space(study.space), study.num_samples
                search = BasicVariantGenerator(random_state=study.seed)
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=study.metric, mode="max", num_samples=samples,
                    max_concurrent_trials=study.max_concurrent, search_alg=search,
                    scheduler=_scheduler(study.scheduler),
                    reuse_actors=True,  # one worker process runs trial after trial: no torch import per trial
                ),
                run_config=tune.RunConfig(name="study", storage_path=storage, verbose=1 if progress else 0),
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
    return finish_study(cfg, out, rows, plan=plan)


def trial_dirs(out: Path) -> list[Path]:
    """Every trial run directory that holds a ledger, whether or not Tune still knows the trial (a trial that ran
    before a crash is counted, so the study ledger never under-counts)."""
    root = out / "trials"
    return sorted(d for d in root.iterdir() if (d / "ledger.jsonl").is_file()) if root.is_dir() else []


def finish_study(cfg: StudyConfig, out: Path, rows: list[dict[str, Any]], *,
                 plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """Choose, run the final (public_proxy), build the study ledger, write results, best.yaml and the report
    (repeat_and_select: also ``release/``, the only part of the study directory meant to be published)."""
    from launch.config import dump_yaml

    study = cfg.study
    scored = [r for r in rows if r["status"] == "completed" and not math.isnan(r[study.metric])]
    if not scored and study.mode != "repeat_and_select":
        raise RuntimeError("no trial completed with a finite metric; see the trials' reports")
    best = max(scored, key=lambda r: r[study.metric]) if scored else None
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if best is not None:
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
        tuning_cost = "0: trials saw only public proxy data"
    elif study.mode == "repeat_and_select":
        assert plan is not None
        dirs = trial_dirs(out)
        drawn = json.loads((out / DRAW_FILE).read_text())["num_trials"]
        if len(dirs) > drawn:
            raise RuntimeError(f"{out}: {len(dirs)} trial directories but {drawn} trials were drawn; a study that ran "
                               "more trials than it drew is not covered by repeat-and-select: release nothing")
        privacy = repeat_select_ledger(plan, study, dirs, out / "ledger.jsonl", run_id=out.name)
        tuning_cost = (f"best of a secret random number of private trials ({study.trial_distribution}, mean "
                       f"{study.mean_trials:g}): RepeatAndSelectDpEvent over the per-trial RDP bound")
    else:
        privacy = compose_ledger(trial_dirs(out), out / "ledger.jsonl", run_id=out.name)
        tuning_cost = "every trial composed sequentially on the study ledger"
    report = {
        "schema": "dpalign.study",
        "study": out.name,
        "mode": study.mode,
        "metric": study.metric,
        "trials": rows,
        "best": best,
        "final": public_metrics(final) | {"run_dir": final["_run_dir"]} if final is not None else None,
        "privacy": privacy,
        "tuning_cost": tuning_cost,
    }
    if study.mode == "repeat_and_select":
        report["plan"] = plan
        report["release"] = _release(report, out) if best is not None else None
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    _write_markdown(report, out)
    return report


def _release(report: dict[str, Any], out: Path) -> str:
    """repeat_and_select: what may be published -- the winning trial's run directory (its models and its own
    report), best.yaml, and the study's epsilon. Nothing about the other trials, not even how many there were."""
    rel = out / "release"
    best = report["best"]
    if rel.exists():
        shutil.rmtree(rel)
    shutil.copytree(best["run_dir"], rel / "run", ignore=shutil.ignore_patterns("checkpoints", "tb"))
    shutil.copyfile(out / "best.yaml", rel / "best.yaml")
    privacy = report["privacy"]
    public = {
        "schema": "dpalign.study.release",
        "mode": "repeat_and_select",
        "metric": report["metric"],
        "chosen": best["overrides"],
        "public_metrics": {k: best[k] for k in METRICS},
        "study_epsilon": privacy["epsilon"],
        "study_delta": privacy["delta"],
        "accountant": f"rdp at order {privacy['rdp_order']:g} (dp-accounting RepeatAndSelectDpEvent)",
        "tuning": {k: privacy["tuning"][k] for k in ("distribution", "mean_trials", "shape")},
    }
    (rel / "report.json").write_text(json.dumps(public, indent=1) + "\n")
    return str(rel)


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


def repeat_select_ledger(plan: dict[str, Any], study: StudySection, run_dirs: list[Path], path: Path, *,
                         run_id: str) -> dict[str, Any]:
    """repeat_and_select: one ledger with the ``tuning`` event (the per-trial RDP bound, and K's law) and every
    event of every trial that ran (stages renamed ``t<i>.<stage>``), at the trials' one RDP order; its epsilon is
    ``RepeatAndSelectDpEvent`` over the bound (``accounting.ledger.compute_privacy``). Each trial's own ledger is
    checked to be under the filter the bound assumes."""
    import hashlib

    from accounting.events import PrivacyEvent
    from accounting.ledger import TUNING_STAGE, Ledger, read_ledger

    trials = [read_ledger(d / "ledger.jsonl") for d in run_dirs]
    for d, t in zip(run_dirs, trials, strict=True):
        r = t.run
        if (r.accountant, r.rdp_order, r.target_delta, r.target_epsilon) != (
                "rdp", plan["order"], plan["delta"], plan["trial_target_epsilon"]):
            raise RuntimeError(f"{d}: trial ledger {r} does not run under the filter the study's bound assumes "
                               f"(rdp at order {plan['order']}, delta {plan['delta']}, "
                               f"epsilon {plan['trial_target_epsilon']})")
    stages = [h for t in trials for h in t.stages.values()]
    fingerprint = "sha256:" + hashlib.sha256("\n".join(sorted({h.user_fingerprint for h in stages})).encode()
                                             ).hexdigest()
    path.unlink(missing_ok=True)
    target = max(plan["epsilon"], plan["trial_target_epsilon"])
    with Ledger.open(path, run_id=run_id, target_epsilon=target, target_delta=plan["delta"], accountant="rdp",
                     composition="repeat_and_select", rdp_order=plan["order"]) as ledger:
        ledger.begin_stage(TUNING_STAGE, user_fingerprint=fingerprint,
                           num_users=max((h.num_users for h in stages), default=1),
                           target_epsilon=plan["trial_target_epsilon"], target_delta=plan["delta"])
        ledger.record_tuning(trial_bound_sigma=plan["trial_bound_sigma"], distribution=study.trial_distribution,
                             mean_trials=study.mean_trials, shape=study.trial_shape)
        ledger.end_stage(TUNING_STAGE)
        for i, contents in enumerate(trials):
            for name, header in contents.stages.items():
                stage = f"t{i}.{name}"
                ledger.begin_stage(stage, user_fingerprint=header.user_fingerprint, num_users=header.num_users,
                                   target_epsilon=header.target_epsilon, target_delta=header.target_delta)
                for e in contents.events:
                    if e.stage == name:
                        ledger.record(PrivacyEvent(stage, e.step, e.purpose, e.sampling_rate, e.noise_multiplier,
                                                   e.repeats), enforce=False)
                end = contents.stage_end.get(name, {"status": "failed", "reason": "trial did not finish"})
                ledger.end_stage(stage, status=end["status"], reason=end["reason"])
        return ledger.report()


SPLIT_FIELDS = {"data.sft_user_fraction": "D1 (SFT)", "data.rm_user_fraction": "D2 (reward model)"}


def _value_of(overrides: list[str], field_name: str) -> float | None:
    """The value a trial used for ``field_name`` (a user-split fraction), if the study searched it."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key == field_name:
            return float(value)
    return None


def _write_markdown(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    metric = report["metric"]
    rows = report["trials"]
    b = report["best"]
    (out / "plots").mkdir(exist_ok=True)
    splits = [f for f in SPLIT_FIELDS if any(_value_of(r["overrides"], f) is not None for r in rows)]
    fig, axes = plt.subplots(1, 1 + len(splits), figsize=(4.5 * (1 + len(splits)), 3.5), squeeze=False)
    ax = axes[0][0]
    ax.scatter([r["epsilon"] for r in rows], [r[metric] for r in rows], label="trials")
    if b is not None:
        ax.scatter([b["epsilon"]], [b[metric]], marker="*", s=200, label="chosen")
    ax.set_xlim(0.0, 1.1 * max([r["epsilon"] for r in rows] + [report["privacy"]["epsilon"], 1e-9]))
    ax.axvline(report["privacy"]["epsilon"], color="grey", linestyle="--", label="study epsilon")
    ax.set_xlabel("trial epsilon" + (" (public proxy: not private)" if report["mode"] == "public_proxy" else ""))
    ax.set_ylabel(f"{metric} (public held-out)")
    ax.legend()
    for ax, f in zip(axes[0][1:], splits, strict=True):
        pts = [(_value_of(r["overrides"], f), r[metric]) for r in rows if _value_of(r["overrides"], f) is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label="trials")
        if b is not None and _value_of(b["overrides"], f) is not None:
            ax.scatter([_value_of(b["overrides"], f)], [b[metric]], marker="*", s=200, label="chosen")
        ax.set_xlabel(f"{f}: share of private users in {SPLIT_FIELDS[f]}", fontsize=8)
        ax.legend()
    fig.suptitle(f"{report['mode']}: study epsilon {report['privacy']['epsilon']:.3g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "plots" / "trials.png", dpi=100)
    plt.close(fig)
    privacy = report["privacy"]
    lines = [f"# dpalign study {report['study']}", ""]
    if report["mode"] == "repeat_and_select":
        lines += ["**Private record of the study: do not publish this file, `results.jsonl`, `trials/`, `ray_tune/`, "
                  "`tuning_draw.json` or `ledger.jsonl` (they show every trial and how many ran, which the "
                  "theorem needs hidden). Publish `release/` only.**", ""]
    lines += [
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
    if b is None:
        lines += ["", "No trial was drawn (Poisson K = 0) or none completed: nothing is released."]
    else:
        lines += ["", f"Chosen: `{' '.join(b['overrides'])}` -> `best.yaml` (`dpalign run --config best.yaml`)."]
    if report["final"] is not None:
        f = report["final"]
        lines += [f"Final private run ({f['run_dir']}): ε = {f['epsilon']:.4g}, final gold {f['final_gold_reward']:+.3f}, "
                  f"gain over SFT {f['gain_over_sft']:+.3f}."]
    lines += ["", "![trials](plots/trials.png)", ""]
    (out / "report.md").write_text("\n".join(lines))

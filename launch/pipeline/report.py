"""report.json (a stable, versioned schema: docs/report_schema.md) and report.md with PNG plots.

The report's ``privacy`` object is exactly ``accounting.ledger.Ledger.report()`` -- the value
``dpalign privacy verify RUN_DIR`` recomputes from ledger.jsonl and compares -- so this module copies it verbatim
and never computes an epsilon itself. Per-stage mechanism parameters (sigma_eff, q, steps, K, N) sit under
``stages.<name>.privacy``, next to the spent epsilon copied from the ledger's stage entry.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCHEMA = "dpalign.report"
SCHEMA_VERSION = 2
POLICIES: tuple[str, ...] = ("base", "sft", "final")
_VERSIONED = ("torch", "transformers", "peft", "ray", "dp-accounting", "opacus", "deepspeed", "tokenizers")


class ReportSchemaError(ValueError):
    """A report does not follow docs/report_schema.md; the message names the field path."""


@dataclass(frozen=True)
class StagePrivacy:
    """What a private stage's mechanism was (``stages.<name>.privacy`` in report.json).

    Attributes:
        target_epsilon, delta: the stage's budget (from the config and the data, see trainers.stages.config).
        epsilon_spent: the ledger's epsilon of the stage at ``delta`` (copied from ``privacy.stages.<name>``).
        accountant: "pld" or "rdp".
        composition: "parallel" or "sequential".
        noise_multiplier: sigma_eff of each release (the calibrated sigma; the last one if it varied).
        grad_noise_multiplier: the gradient release's own multiplier (sum_k C_k^2 / s_k^2)^(-1/2) of the last step.
        count_noise_std: sigma_b on each CENTRED clip count (adaptive clipping, the controller), else None.
        num_groups: K, the clipping groups (one clip count each when counts are released).
            An auditor recomputes sigma_eff = (grad^-2 + K (2 sigma_b)^-2)^(-1/2) (= grad without counts).
        sampling_rate: Poisson rate q.
        steps: Poisson-sampled events of the stage (PPO: iterations).
        repeats: K releases per sampled batch (PPO epochs; 1 otherwise).
        num_users: N, the stage's users.
        expected_batch_users: q * N, the public normalizer of the noisy sum.
    """

    target_epsilon: float
    delta: float
    epsilon_spent: float
    accountant: str
    composition: str
    noise_multiplier: float
    sampling_rate: float
    steps: int
    repeats: int
    num_users: int
    expected_batch_users: float
    grad_noise_multiplier: float
    count_noise_std: float | None
    num_groups: int


def stage_entry(
    *,
    private: bool,
    reason: str,
    status: str,
    wall_time_s: float | None,
    privacy: StagePrivacy | None = None,
    metrics: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One ``stages.<name>`` object. ``privacy`` is required exactly when the stage is private.

    ``metrics`` holds public or released final numbers of the stage (e.g. the noisy final loss), never raw
    private statistics. ``wall_time_s`` is None where it is not published (a private stage's time follows its
    private batch sizes; ``run.report_wall_time`` publishes it).
    """
    if private != (privacy is not None):
        raise ReportSchemaError(
            "stage_entry: a private stage needs its StagePrivacy and a public stage must not have one"
        )
    return {
        "private": private,
        "reason": reason,
        "status": status,
        "wall_time_s": None if wall_time_s is None else float(wall_time_s),
        "privacy": asdict(privacy) if privacy is not None else None,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }


def versions() -> dict[str, str]:
    """Versions of Python, dpalign (and its git commit when available) and the numerical packages."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("dpalign", *_VERSIONED):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        out["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


def build_report(
    *,
    run_id: str,
    preset: str,
    status: str,
    stages: Mapping[str, dict[str, Any]],
    ledger_privacy: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any],
    series: Mapping[str, Any],
    wall_time_s: Mapping[str, float],
    noise: Mapping[str, Any],
    created: float | None = None,
    versions_info: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Assemble and validate a report (docs/report_schema.md).

    Args:
        run_id: the run's id (the ledger's run_id).
        preset: "private", "nonprivate", "decoupled" or "ppo_only".
        status: "completed" or "partial" (a stage failed or was refused).
        stages: ``{name: stage_entry(...)}`` in stage order.
        ledger_privacy: ``Ledger.report()`` (verbatim), or None when no stage is private (no ledger events).
        evaluation: see the schema ("policies", "reward_model", "prompts", "seeds").
        series: ``{"ppo": [{"iteration", "gold_reward", "kl"}], "epsilon": {stage: [[step, eps], ...]}}``.
        wall_time_s: seconds per published phase ("data", "base_model", "eval", non-private stages; private
            stages and "total" only with ``run.report_wall_time``).
        noise: ``trainers.stages.context.noise_disclosure``: secret or reproducible noise, the generator, and the
            NOT PRIVATE warning of a reproducible run.

    Raises:
        ReportSchemaError: the assembled report does not follow the schema.
    """
    report = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "preset": preset,
        "status": status,
        "created": created if created is not None else time.time(),
        "stages": {name: dict(entry) for name, entry in stages.items()},
        "privacy": dict(ledger_privacy) if ledger_privacy is not None else None,
        "evaluation": json.loads(json.dumps(evaluation)),
        "series": json.loads(json.dumps(series)),
        "wall_time_s": {k: float(v) for k, v in wall_time_s.items()},
        "noise": dict(noise),
        "versions": dict(versions_info) if versions_info is not None else versions(),
    }
    validate_report(report)
    return report


GOLD_REWARD_KEY = "eval/gold_reward"
"""Metric key of the mean gold reward on held-out public prompts, logged by the PPO stage per iteration."""
KL_KEY = "ppo/kl"
"""Metric key of the (released) KL to the reference per PPO iteration."""
EPSILON_KEY = "privacy/epsilon"
"""Metric key of the epsilon spent after each step, logged by every private stage."""


def series_from_metrics(rows: Sequence[Mapping[str, Any]], *, ppo_stage: str = "ppo") -> dict[str, Any]:
    """The report's ``series`` from metrics.jsonl rows (``launch.pipeline.metrics.read_metrics``).

    Reads :data:`GOLD_REWARD_KEY` and :data:`KL_KEY` of ``ppo_stage`` per iteration, and :data:`EPSILON_KEY` of
    every stage; a step logged twice (a resumed stage) keeps its last value.
    """
    from launch.pipeline.metrics import series

    gold = dict(series(list(rows), GOLD_REWARD_KEY, stage=ppo_stage))
    kl = dict(series(list(rows), KL_KEY, stage=ppo_stage))
    ppo = [{"iteration": it, "gold_reward": gold.get(it), "kl": kl.get(it)} for it in sorted(set(gold) | set(kl))]
    stages = sorted({r["stage"] for r in rows if r["key"] == EPSILON_KEY})
    epsilon = {st: [[step, value] for step, value in series(list(rows), EPSILON_KEY, stage=st)] for st in stages}
    return {"ppo": ppo, "epsilon": epsilon}


# ---- validation -----------------------------------------------------------------------------------------------
def _need(obj: Any, key: str, types: type | tuple[type, ...], where: str, nullable: bool = False) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ReportSchemaError(f"{where}.{key}: missing")
    value = obj[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ReportSchemaError(f"{where}.{key}: expected {types}, got a bool")
    if not isinstance(value, types):
        raise ReportSchemaError(f"{where}.{key}: expected {types}, got {type(value).__name__}")
    return value


_NUM = (int, float)


def _check_ci(obj: Any, where: str) -> None:
    for key in ("mean", "lo", "hi"):
        _need(obj, key, _NUM, where)
    _need(obj, "n", int, where)
    if not obj["lo"] <= obj["mean"] <= obj["hi"]:
        raise ReportSchemaError(f"{where}: need lo <= mean <= hi, got {obj}")


def validate_report(report: Mapping[str, Any]) -> None:
    """Check ``report`` against schema version 1 (docs/report_schema.md).

    Raises:
        ReportSchemaError: naming the first offending field path.
    """
    w = "report"
    if _need(report, "schema", str, w) != SCHEMA:
        raise ReportSchemaError(f"report.schema: expected {SCHEMA!r}")
    if _need(report, "schema_version", int, w) != SCHEMA_VERSION:
        raise ReportSchemaError(f"report.schema_version: this dpalign writes and reads version {SCHEMA_VERSION}")
    _need(report, "run_id", str, w)
    if _need(report, "preset", str, w) not in ("private", "nonprivate", "decoupled", "ppo_only"):
        raise ReportSchemaError("report.preset: must be private, nonprivate, decoupled or ppo_only")
    if _need(report, "status", str, w) not in ("completed", "partial"):
        raise ReportSchemaError("report.status: must be completed or partial")
    _need(report, "created", _NUM, w)
    stages = _need(report, "stages", dict, w)
    privacy = _need(report, "privacy", dict, w, nullable=True)
    any_private = False
    for name, entry in stages.items():
        sw = f"report.stages.{name}"
        private = _need(entry, "private", bool, sw)
        _need(entry, "reason", str, sw)
        _need(entry, "status", str, sw)
        _need(entry, "wall_time_s", _NUM, sw, nullable=True)
        _need(entry, "metrics", dict, sw)
        sp = _need(entry, "privacy", dict, sw, nullable=True)
        if private != (sp is not None):
            raise ReportSchemaError(f"{sw}.privacy: must be an object exactly when the stage is private")
        if sp is not None:
            any_private = True
            for field_name, tp in StagePrivacy.__annotations__.items():
                kind = str if tp == "str" else (int if tp == "int" else _NUM)
                _need(sp, field_name, kind, f"{sw}.privacy", nullable=tp.endswith("| None"))
            if privacy is None or name not in privacy.get("stages", {}):
                raise ReportSchemaError(f"{sw}: private stage missing from report.privacy.stages (the ledger)")
            ledger_eps = privacy["stages"][name]["epsilon"]
            if not math.isclose(sp["epsilon_spent"], ledger_eps, rel_tol=1e-9, abs_tol=1e-12):
                raise ReportSchemaError(
                    f"{sw}.privacy.epsilon_spent={sp['epsilon_spent']} differs from the ledger's {ledger_eps}"
                )
    if privacy is not None:
        for key in ("run_id", "epsilon", "delta", "accountant", "composition", "stages"):
            _need(privacy, key, (str, int, float, dict), "report.privacy")
        if privacy["run_id"] != report["run_id"]:
            raise ReportSchemaError("report.privacy.run_id: differs from report.run_id (a ledger of another run)")
    elif any_private:
        raise ReportSchemaError("report.privacy: null although a stage is private")
    ev = _need(report, "evaluation", dict, w)
    _need(ev, "prompts", int, "report.evaluation")
    _need(ev, "seeds", list, "report.evaluation")
    policies = _need(ev, "policies", dict, "report.evaluation")
    for pname, pol in policies.items():
        pw = f"report.evaluation.policies.{pname}"
        if pname not in POLICIES:
            raise ReportSchemaError(f"{pw}: unknown policy; allowed {POLICIES}")
        _check_ci(_need(pol, "gold_reward", dict, pw), f"{pw}.gold_reward")
        _need(pol, "kl_to_sft", _NUM, pw, nullable=True)
        _need(pol, "perplexity", _NUM, pw, nullable=True)
    rm = _need(ev, "reward_model", dict, "report.evaluation", nullable=True)
    if rm is not None:
        _need(rm, "accuracy", _NUM, "report.evaluation.reward_model")
        _need(rm, "pairs", int, "report.evaluation.reward_model")
    ser = _need(report, "series", dict, w)
    for i, row in enumerate(_need(ser, "ppo", list, "report.series")):
        _need(row, "iteration", int, f"report.series.ppo[{i}]")
        _need(row, "gold_reward", _NUM, f"report.series.ppo[{i}]", nullable=True)
        _need(row, "kl", _NUM, f"report.series.ppo[{i}]", nullable=True)
    for stage, points in _need(ser, "epsilon", dict, "report.series").items():
        if not all(isinstance(p, list) and len(p) == 2 for p in points):
            raise ReportSchemaError(f"report.series.epsilon.{stage}: expected a list of [step, epsilon] pairs")
    wall = _need(report, "wall_time_s", dict, w)
    for key in wall:
        _need(wall, key, _NUM, "report.wall_time_s")
    noise = _need(report, "noise", dict, w)
    if not isinstance(noise.get("secret"), bool):
        raise ReportSchemaError("report.noise.secret: must be true or false")
    _need(noise, "description", str, "report.noise")
    warning = _need(noise, "warning", str, "report.noise", nullable=True)
    if noise["secret"] == (warning is not None):
        raise ReportSchemaError("report.noise.warning: a string exactly when the noise is not secret")
    _need(report, "versions", dict, w)


def budget_violations(report: Mapping[str, Any], *, rel_tol: float = 1e-9) -> list[str]:
    """Private stages whose spent epsilon exceeds their target, and an overall epsilon above the run's target."""
    out = []
    for name, entry in report["stages"].items():
        sp = entry.get("privacy")
        if sp is not None and sp["epsilon_spent"] > sp["target_epsilon"] * (1 + rel_tol):
            out.append(f"{name}: epsilon {sp['epsilon_spent']:.6g} > target {sp['target_epsilon']:.6g}")
    privacy = report.get("privacy")
    if privacy is not None and privacy["epsilon"] > privacy["target_epsilon"] * (1 + rel_tol):
        out.append(f"run: epsilon {privacy['epsilon']:.6g} > target {privacy['target_epsilon']:.6g}")
    return out


# ---- plots and markdown ---------------------------------------------------------------------------------------
def make_plots(report: Mapping[str, Any], plots_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """PNG plots of the report's series; a plot with no data is skipped (absent from the result).

    Returns:
        ``{"gold_reward": path, "epsilon": path, "kl": path}`` for the plots made.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display: CI, Ray workers, ssh sessions
    import matplotlib.pyplot as plt

    out_dir = Path(plots_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    ppo = report["series"]["ppo"]
    policies = report["evaluation"]["policies"]

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made[name] = path

    points = [(r["iteration"], r["gold_reward"]) for r in ppo if r["gold_reward"] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*points, strict=False), marker="o", label="policy (PPO)")
        for pname, style in (("base", ":"), ("sft", "--")):
            if pname in policies:
                ax.axhline(policies[pname]["gold_reward"]["mean"], linestyle=style, color="gray", label=pname)
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel("mean gold reward (held-out prompts)")
        ax.legend()
        save(fig, "gold_reward")
    eps = {s: p for s, p in report["series"]["epsilon"].items() if p}
    if eps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for stage, pts in eps.items():
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=stage)[0]
            sp = report["stages"].get(stage, {}).get("privacy")
            if sp:
                ax.axhline(sp["target_epsilon"], linestyle="--", color=line.get_color(), linewidth=0.8)
        ax.set_xlabel("step (per stage)")
        ax.set_ylabel("epsilon spent (dashed: target)")
        ax.legend()
        save(fig, "epsilon")
    points = [(r["iteration"], r["kl"]) for r in ppo if r["kl"] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*points, strict=False), marker="o")
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel("KL(policy || SFT reference), nats/sequence")
        save(fig, "kl")
    return made


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, Path], *, base: Path) -> str:
    """report.md: what was protected, privacy per stage, evaluation with 95% intervals, wall time, plots."""
    lines = [f"# dpalign run {report['run_id']}", ""]
    noise = report["noise"]
    if noise["warning"]:
        lines += [f"> **WARNING — {noise['warning']}.**", ""]
    lines += [f"Preset: **{report['preset']}**. Status: **{report['status']}**.", ""]
    privacy = report["privacy"]
    if privacy is not None:
        lines += [
            f"Overall: ε = {_fmt(privacy['epsilon'])} (target {_fmt(privacy.get('target_epsilon'))}) at "
            f"δ = {_fmt(privacy['delta'])}; accountant {privacy['accountant']}, "
            f"{privacy['composition']} composition. Verify with `dpalign privacy verify RUN_DIR`.",
            "",
            f"Noise and sampling: {noise['description']}.",
            "",
        ]
    else:
        lines += ["No stage was private: this run gives no privacy guarantee.", ""]
    task, base_model = report.get("task"), report.get("base_model")
    if task:
        lines += ["## Data and base model", "", "| split | users |", "|---|---|"]
        for split, users in task["users"].items():
            lines.append(f"| {split} | {users} |")
        if task.get("per_record_users"):
            lines.append(f"\nNo user_id column in {', '.join(task['per_record_users'])}: each record is its own user.")
        lines.append("")
    if base_model and base_model.get("perplexity") is not None:
        lines += [
            f"Base model: {base_model['params']:,} parameters; perplexity on held-out text of its public "
            f"pretraining corpus {_fmt(base_model['perplexity'])} against a unigram model's "
            f"{_fmt(base_model['unigram_perplexity'])} (the evaluation table's perplexity is on the stages' "
            "validation text).",
            "",
        ]
    lines += ["## What was protected", "", "| stage | private | why |", "|---|---|---|"]
    for name, st in report["stages"].items():
        lines.append(f"| {name} | {'yes' if st['private'] else 'no'} | {st['reason']} |")
    lines += [
        "",
        "## Privacy per stage",
        "",
        "| stage | target ε | δ | spent ε | σ_eff | σ_grad | σ_b (counts) | groups | q | steps | K | N users | B=qN "
        "| composition | accountant |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in report["stages"].items():
        sp = st["privacy"]
        if sp is None:
            lines.append(f"| {name} | public | | | | | | | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {_fmt(sp['target_epsilon'])} | {_fmt(sp['delta'])} | {_fmt(sp['epsilon_spent'])} | "
            f"{_fmt(sp['noise_multiplier'])} | {_fmt(sp['grad_noise_multiplier'])} | {_fmt(sp['count_noise_std'])} | "
            f"{sp['num_groups']} | {_fmt(sp['sampling_rate'])} | {sp['steps']} | {sp['repeats']} | "
            f"{sp['num_users']} | {_fmt(sp['expected_batch_users'])} | {sp['composition']} | {sp['accountant']} |"
        )
    ev = report["evaluation"]
    lines += [
        "",
        "## Evaluation",
        "",
        f"{ev['prompts']} held-out prompts, seeds {ev['seeds']}; gold reward is the mean VADER score with a 95% "
        "t-interval.",
        "",
        "| policy | gold reward | 95% CI | KL to SFT | perplexity |",
        "|---|---|---|---|---|",
    ]
    for pname, pol in ev["policies"].items():
        g = pol["gold_reward"]
        lines.append(
            f"| {pname} | {g['mean']:.3f} | [{g['lo']:.3f}, {g['hi']:.3f}] | {_fmt(pol['kl_to_sft'])} | "
            f"{_fmt(pol['perplexity'])} |"
        )
    rm = ev.get("reward_model")
    if rm is not None:
        lines += ["", f"Reward model pairwise accuracy on {rm['pairs']} held-out gold pairs: {rm['accuracy']:.3f}."]
    lines += ["", "## Wall time", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["wall_time_s"].items()]
    withheld = [name for name, st in report["stages"].items() if st["wall_time_s"] is None]
    if withheld:
        lines += ["", f"Not published: the wall time of {', '.join(withheld)} (it follows the private batch sizes; "
                  "`run.report_wall_time=true` publishes it) and so the total."]
    lines += ["", "σ_eff = (σ_grad⁻² + groups·(2σ_b)⁻²)^(-1/2): the clip counts are released centred, Σ(b−½) + "
              "noise, sensitivity ½ each; without counts σ_eff = σ_grad."]
    if plots:
        lines += ["", "## Plots", ""]
        titles = {"gold_reward": "Gold reward per PPO iteration", "epsilon": "ε spent per step", "kl": "KL to SFT"}
        for name, path in plots.items():
            lines += [f"![{titles.get(name, name)}]({os.path.relpath(path, base)})", ""]
    lines += ["## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]
    return "\n".join(lines) + "\n"


def write_report(
    report: Mapping[str, Any],
    *,
    report_json: str | os.PathLike[str],
    report_md: str | os.PathLike[str],
    plots_dir: str | os.PathLike[str],
) -> dict[str, Path]:
    """Validate, then write the plots, report.md and (last, atomically) report.json.

    report.json is written last so that its presence means the whole report exists.
    """
    from launch.pipeline.rundir import atomic_write_text

    validate_report(report)
    md_path, json_path = Path(report_md), Path(report_json)
    plots = make_plots(report, plots_dir)
    atomic_write_text(md_path, render_markdown(report, plots, base=md_path.parent))
    atomic_write_text(json_path, json.dumps(report, indent=1, allow_nan=False) + "\n")
    return {"report_json": json_path, "report_md": md_path, **plots}


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a report.json."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportSchemaError(f"{path}: cannot read a report ({err})") from None
    validate_report(report)
    return report


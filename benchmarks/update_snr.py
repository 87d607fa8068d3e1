"""Signal against noise in every noisy update of a private run, per clipping group: where DP costs utility.

Runs `dpalign run` in this process on the embedded (synthetic) task and, at every private release, records for
each clipping group k of the stage's engine:

- ``threshold``: C_k, the group's clip threshold that step;
- ``norm_median`` / ``norm_p90``: the users' unclipped group norms (median and 90th percentile);
- ``clipped``: the fraction of sampled users whose group norm exceeded C_k;
- ``signal``: ||sum of clipped group gradients|| / B, the norm of the update's expectation part;
- ``noise``: std_k * sqrt(numel_k) / B, the expected norm of the update's noise part;
- ``snr``: signal / noise.

An SNR well below 1 means the step is mostly noise: a larger expected batch B (noise / B falls faster than sigma
rises at these rates), fewer trainable coordinates (the noise norm grows with sqrt(numel)) or a threshold that fits
the group's norms raise it; the table shows which group needs which.

This benchmark reads raw per-user gradient norms, which are PRIVATE data: it refuses anything but the embedded
task's synthetic users (``data.source=embedded``), like the audits, and its numbers are a measurement of the
benchmark's population, never a release.

    .venv/bin/python benchmarks/update_snr.py --json                         # the demo config as shipped
    .venv/bin/python benchmarks/update_snr.py --json ppo.lora.r=1            # the same run with rank-1 PPO LoRA

Extra ``key=value`` arguments are config overrides of the run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class SNRProbe:
    """Wraps ``DPEngine.clip_and_sum`` (the engine's one place where per-user gradients meet their thresholds) and
    records each group's statistics before the noise is added; the engine's numbers are returned unchanged."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._releases: dict[str, int] = {}
        self._original: Any = None

    def __enter__(self) -> SNRProbe:
        from trainers.engine.engine import DPEngine

        self._original = DPEngine.clip_and_sum
        probe = self

        def clip_and_sum(engine: Any, per_user: list[Any], clip_norms: Any) -> Any:
            out = probe._original(engine, per_user, clip_norms)
            probe.record(engine, per_user, clip_norms, out[0])
            return out

        DPEngine.clip_and_sum = clip_and_sum
        return self

    def __exit__(self, *exc: object) -> None:
        from trainers.engine.engine import DPEngine

        DPEngine.clip_and_sum = self._original

    def record(self, engine: Any, per_user: list[Any], clip_norms: Any, sums: list[Any]) -> None:
        import torch

        from trainers.engine.per_user import sq_norms

        plan = engine.last_plan
        if plan is None:  # a non-private engine has no noise to compare with
            return
        b = engine.expected_batch_size
        groups = []
        for k, members in enumerate(engine.group_members):
            norms = torch.sqrt(sum(sq_norms(per_user[i]) for i in members)).double()
            c = float(clip_norms[k])
            signal = math.sqrt(sum(float(sums[i].double().pow(2).sum()) for i in members)) / b
            numel = sum(sums[i].numel() for i in members)
            noise = float(plan.noise_stds[k]) * math.sqrt(numel) / b
            groups.append({
                "group": engine.groups[k].name, "numel": numel, "threshold": c,
                "norm_median": float(norms.median()) if norms.numel() else 0.0,
                "norm_p90": float(norms.quantile(0.9)) if norms.numel() else 0.0,
                "clipped": float((norms > c).double().mean()) if norms.numel() else 0.0,
                "signal": signal, "noise": noise, "snr": signal / noise if noise > 0 else math.inf,
            })
        # The stage's release index (its step when ppo_epochs is 1; K repeats of one sample are K releases).
        release = self._releases[engine.stage] = self._releases.get(engine.stage, -1) + 1
        self.rows.append({"stage": engine.stage, "release": release, "users": int(per_user[0].shape[0]),
                          "groups": groups})


def summarize(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per stage and group: the median over the stage's releases of every statistic."""
    out: dict[str, list[dict[str, Any]]] = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        steps = [r["groups"] for r in rows if r["stage"] == stage]
        table = []
        for k, first in enumerate(steps[0]):
            col = [s[k] for s in steps]
            entry = {"group": first["group"], "numel": first["numel"], "releases": len(col)}
            for key in ("threshold", "norm_median", "norm_p90", "clipped", "signal", "noise", "snr"):
                entry[key] = statistics.median(c[key] for c in col)
            table.append(entry)
        out[stage] = table
    return out


def _common() -> Any:
    """benchmarks/_common.py by path: this script imports the project's ``controller`` package, which the
    directory's own controller.py would shadow if the directory were on sys.path first."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_common", Path(__file__).with_name("_common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    common = _common()
    LoadAverage, emit, repo_relative = common.LoadAverage, common.emit, common.repo_relative

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "launch" / "configs" / "demo.yaml"))
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--json-out", help="also write the JSON (indented) to this file")
    ap.add_argument("--steps", action="store_true", help="keep every release's row in the JSON, not only medians")
    ap.add_argument("--run-dir", help="keep the run here (default: a temporary directory, removed afterwards)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()

    from launch.cli import main as cli_main
    from launch.config import load_config
    from launch.schema import RunConfig

    cfg = load_config(RunConfig, args.config, list(args.overrides))
    if cfg.data.source != "embedded":
        ap.error(f"data.source={cfg.data.source}: this benchmark reads raw per-user gradient norms, which only the "
                 "embedded task's synthetic users may show; use data.source=embedded")
    if not cfg.privacy.private_stages:
        ap.error("privacy.preset=nonprivate adds no noise: there is no signal-to-noise ratio to measure")
    load = LoadAverage()
    with tempfile.TemporaryDirectory(prefix="dpalign-snr-") as tmp, SNRProbe() as probe:
        run_dir = args.run_dir or str(Path(tmp) / "run")
        rc = cli_main(["run", "--config", args.config, "--no-progress", "ppo.rollout_actors=0", *args.overrides,
                       f"run.dir={run_dir}"])
    if rc != 0:
        print(f"dpalign run failed (exit {rc})", file=sys.stderr)
        return rc
    load.stop()
    if not probe.rows:
        print("no private release ran in this process: keep ray.num_workers=0 (learners on Ray workers are out of "
              "the probe's reach)", file=sys.stderr)
        return 2
    table = summarize(probe.rows)
    for stage, groups in table.items():
        print(f"{stage}: median over {groups[0]['releases']} releases")
        print(f"  {'group':<48} {'numel':>6} {'C_k':>7} {'norm med':>9} {'clipped':>8} {'signal':>8} {'noise':>8} "
              f"{'SNR':>6}")
        for g in groups:
            name = g["group"].split("base_model.model.")[-1]  # peft's wrapper prefix says nothing here
            print(f"  {name[-48:]:<48} {g['numel']:>6} {g['threshold']:>7.3f} {g['norm_median']:>9.3f} "
                  f"{g['clipped']:>8.2f} {g['signal']:>8.4f} {g['noise']:>8.4f} {g['snr']:>6.2f}")
    print(load.line())
    blob: dict[str, Any] = {"benchmark": "update_snr", "config": repo_relative(args.config),
                            "overrides": list(args.overrides), "stages": table, **load.fields()}
    if args.steps:
        blob["releases"] = probe.rows
    emit(blob, as_json=args.json, json_out=args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Privacy-utility table of the whole pipeline, like Table 1 of Wu et al. (2023).

Runs `dpalign run` on the embedded task for the non-private baseline and for the private preset at each target
epsilon, over several seeds (the data and base model are shared through the cache; the seed changes sampling,
noise, initialization and rollouts), and prints the mean gold reward of the final policy with a 95% interval
over seeds, next to the base and SFT models. It also reports, at each epsilon, the share of the non-private
gain that the private pipeline keeps (target at epsilon=4: >= 80%; Wu et al., GPT-2: about 90%), in two ways:

- ``share_own_sft``: (private final - private SFT) / (non-private final - non-private SFT), each pipeline's PPO
  gain over its own SFT model;
- ``share_vs_nonprivate_sft``: (private final - non-private SFT) / (non-private final - non-private SFT), the
  private pipeline's end result against the non-private SFT baseline (penalizes a worse private SFT too).

Both shares come with Fieller's 95% interval over seeds (``dpalign.stats.ratio_ci95``). Each run's epsilon is also
recomputed from its ledger at Wu et al.'s delta = 1/N (``epsilon_at_delta_1_over_n``: the same released mechanism,
compared like for like), every run is checked with `dpalign privacy verify` (the script exits 1 if one fails), and
``--decoupled-epsilons`` adds reference rows where only the reward model is private (Cho & Sun): the gap between
them and the non-private row is the loss the private reward model alone causes. ``--ppo-only-epsilons`` adds the
mirror rows where only PPO is private (``privacy.preset=ppo_only``: non-private SFT and reward models): the loss
DP-PPO alone causes. With the full private row the three give the decomposition of where the gain is lost.

Each run is a fresh `dpalign run` process (``--jobs`` of them at a time, each with cores/jobs threads; rollouts
are generated in process, ``ppo.rollout_actors=0``, which gives the same samples as Ray actors without starting
one Ray cluster per run). A run whose report.json already exists in ``--out`` is reused, so an interrupted grid
continues where it stopped (use a fresh ``--out`` after changing the config).

    .venv/bin/python benchmarks/privacy_utility.py --json                       # the default grid
    .venv/bin/python benchmarks/privacy_utility.py --epsilons 4 --seeds 0 --config launch/configs/tiny.yaml

Extra ``key=value`` arguments are config overrides applied to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_one(config: str, overrides: list[str], out_dir: Path, *, threads: int) -> dict:
    """One `dpalign run` in a fresh process (or its existing report); returns the numbers the table needs."""
    report_path = out_dir / "report.json"
    if not report_path.is_file():
        if out_dir.exists():
            raise SystemExit(f"{out_dir} holds an unfinished run; remove it or resume it with dpalign run --resume")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        cmd = [sys.executable, "-m", "launch.cli", "run", "--config", config, "--no-progress",
               *overrides, f"run.dir={out_dir}"]
        log = out_dir.parent / f"{out_dir.name}.log"
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        if rc != 0 or not report_path.is_file():
            raise SystemExit(f"run {out_dir} failed (rc={rc}); see {log}")
    report = json.loads(report_path.read_text())
    pols = report["evaluation"]["policies"]
    return {
        "run_dir": out_dir.name,  # no machine path in the committed JSON
        "status": report["status"],
        "epsilon": (report.get("privacy") or {}).get("epsilon"),
        "delta": (report.get("privacy") or {}).get("delta"),
        "epsilon_at_delta_1_over_n": epsilon_at_one_over_n(out_dir),
        "verified": verify(out_dir),
        "gold": {name: pols[name]["gold_reward"]["mean"] for name in pols},
        "gold_ci": {name: [pols[name]["gold_reward"]["lo"], pols[name]["gold_reward"]["hi"]] for name in pols},
        "kl": pols["final"]["kl_to_sft"],
        "rm_accuracy": (report["evaluation"].get("reward_model") or {}).get("accuracy"),
        "seconds": report["wall_time_s"].get("total", float("nan")),
    }


def verify(run_dir: Path) -> bool | None:
    """`dpalign privacy verify RUN_DIR`: the report's epsilon recomputed from the run's ledger alone (None for a
    run that released nothing private: no ledger to verify)."""
    from accounting.verify import verify_run

    if not (run_dir / "ledger.jsonl").is_file():
        report = json.loads((run_dir / "report.json").read_text())
        return None if report.get("privacy") is None else False
    result = verify_run(run_dir)
    if not result.ok:
        print(f"{run_dir.name}: privacy verify FAILED: {'; '.join(result.mismatches)}", file=sys.stderr)
    return result.ok


def epsilon_at_one_over_n(run_dir: Path) -> float | None:
    """The run's epsilon at Wu et al.'s delta = 1/N (N = the stage's users), recomputed from its ledger.

    Stages are user-disjoint (parallel composition), so the pipeline's epsilon is the largest stage epsilon, each
    at its own stage's delta = 1/N_stage. None for a run without private stages."""
    from accounting.ledger_file import read_ledger, stage_epsilon_at

    path = run_dir / "ledger.jsonl"
    if not path.is_file():
        return None
    contents = read_ledger(path)
    eps = [stage_epsilon_at(contents, name, delta=1.0 / header.num_users) for name, header in contents.stages.items()]
    return max(eps) if eps else None


def summarize(rows: list[dict]) -> dict:
    """Per setting: mean final gold with a 95% interval over seeds, SFT/base means, KL, RM accuracy, shares."""
    from dpalign.stats import ci_entry, ratio_ci95

    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    table = {}
    for setting, rs in by.items():
        finals = [r["gold"]["final"] for r in rs]
        table[setting] = {
            "final": ci_entry(finals) if len(rs) > 1 else {"mean": finals[0]},
            "sft": mean([r["gold"]["sft"] for r in rs]),
            "base": mean([r["gold"]["base"] for r in rs]),
            "gain_over_own_sft": ci_entry([r["gold"]["final"] - r["gold"]["sft"] for r in rs])
            if len(rs) > 1 else {"mean": rs[0]["gold"]["final"] - rs[0]["gold"]["sft"]},
            "kl": mean([r["kl"] for r in rs]),
            "rm_accuracy": mean([r["rm_accuracy"] for r in rs]) if all(r["rm_accuracy"] is not None for r in rs)
            else None,
            "epsilon": max((r["epsilon"] or 0.0) for r in rs),
            "delta": max((r.get("delta") or 0.0) for r in rs),
            "epsilon_at_delta_1_over_n": max((r.get("epsilon_at_delta_1_over_n") or 0.0) for r in rs),
            "seeds": len(rs),
        }
    base = table.get("nonprivate")
    if base is not None:
        gain = base["final"]["mean"] - base["sft"]
        base_gains = [r["gold"]["final"] - r["gold"]["sft"] for r in by["nonprivate"]]
        base_sft = base["sft"]
        for setting, row in table.items():
            ok = gain > 0
            row["share_own_sft"] = (row["final"]["mean"] - row["sft"]) / gain if ok else None
            row["share_vs_nonprivate_sft"] = (row["final"]["mean"] - base["sft"]) / gain if ok else None
            rs = by[setting]
            if ok and len(rs) > 1 and len(base_gains) > 1:
                # Fieller's interval over seeds: the private runs' gains against the non-private runs' gains
                row["share_own_sft_ci"] = ratio_ci95([r["gold"]["final"] - r["gold"]["sft"] for r in rs], base_gains)
                row["share_vs_nonprivate_sft_ci"] = ratio_ci95([r["gold"]["final"] - base_sft for r in rs],
                                                               base_gains)
    return table


def main() -> int:
    from _common import repo_relative  # benchmarks/ is the script directory (tests load this file by path)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "launch" / "configs" / "demo.yaml"))
    ap.add_argument("--epsilons", default="4,1,2,8",
                    help="comma-separated target epsilons of the private runs (the first runs first, with the "
                         "non-private baseline)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    ap.add_argument("--decoupled-epsilons", default="4",
                    help="comma-separated epsilons of reference rows with privacy.preset=decoupled (only the reward "
                         "model private, Cho & Sun; the loss the private RM alone causes); empty: none")
    ap.add_argument("--ppo-only-epsilons", default="4",
                    help="comma-separated epsilons of reference rows with privacy.preset=ppo_only (only PPO "
                         "private; the loss DP-PPO alone causes); empty: none")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-privacy-utility"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each gets cores/jobs threads)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="start --jobs runs at once (by default the first run goes alone, to build the data and "
                         "base-model caches once before parallel runs race on them); for a warm cache")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [("nonprivate", ["privacy.preset=nonprivate"])] + [
        (f"eps={e}", ["privacy.preset=private", f"privacy.target_epsilon={e}"]) for e in args.epsilons.split(",")
    ] + [
        (f"decoupled eps={e}", ["privacy.preset=decoupled", f"privacy.target_epsilon={e}"])
        for e in args.decoupled_epsilons.split(",") if e.strip()
    ] + [
        (f"ppo_only eps={e}", ["privacy.preset=ppo_only", f"privacy.target_epsilon={e}"])
        for e in args.ppo_only_epsilons.split(",") if e.strip()
    ]
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # The non-private baseline and the first private epsilon over all seeds come first: the headline share is
    # known (and a bad config can be stopped) before the rest of the grid runs.
    todo = [(name, extra, seed) for name, extra in settings[:2] for seed in seeds]
    todo += [(name, extra, seed) for seed in seeds for name, extra in settings[2:]]
    t0 = time.time()
    if todo and jobs > 1 and not args.no_warmup:  # build the shared data and base-model caches once, alone
        first = todo.pop(0)
    else:
        first = None

    def go(item: tuple[str, list[str], int]) -> dict:
        name, extra, seed = item
        out = Path(args.out) / f"{name.replace(' ', '-')}-seed{seed}"
        # The embedded task's users are synthetic: publishing the runs' wall time is the benchmark's point.
        row = run_one(args.config, ["ppo.rollout_actors=0", "run.report_wall_time=true", *args.overrides, *extra,
                                    f"run.seed={seed}"], out,
                      threads=threads if first is None or item is not first else (os.cpu_count() or 1))
        row.update(setting=name, seed=seed)
        print(f"{name:12s} seed {seed}: final gold {row['gold']['final']:+.3f} (sft {row['gold']['sft']:+.3f}, "
              f"base {row['gold']['base']:+.3f}, KL {row['kl']:.2f}) in {row['seconds']:.0f} s", file=sys.stderr)
        return row

    rows = [go(first)] if first is not None else []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows += list(pool.map(go, todo))

    def order(row: dict) -> tuple:  # the table reads nonprivate, then private by epsilon, then the references
        name = row["setting"]
        return (name != "nonprivate", name.startswith("decoupled"), name.startswith("ppo_only"),
                float(name.rsplit("=", 1)[-1])
                if "=" in name else 0.0, row["seed"])

    rows.sort(key=order)
    table = summarize(rows)
    result = {"config": repo_relative(args.config), "overrides": args.overrides, "seeds": seeds, "table": table, "runs": rows,
              "seconds": time.time() - t0}
    unverified = [r["run_dir"] for r in rows if r["verified"] is False]
    result["all_verified"] = not unverified
    if args.json:
        print(json.dumps(result))
    else:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.2f}"

        def share(row: dict, key: str) -> str:
            ci = row.get(f"{key}_ci")
            lo_hi = "" if ci is None else f" [{fmt(ci['lo'])}, {fmt(ci['hi'])}]"
            return fmt(row.get(key)) + lo_hi

        print(f"{'setting':18s} {'eps':>5s} {'eps@1/N':>7s} {'final gold [95% CI over seeds]':30s} {'SFT':>7s} "
              f"{'base':>7s} {'KL':>5s} {'RM acc':>6s}  share(own SFT) [CI]  share(np SFT) [CI]")
        for name, row in table.items():
            f = row["final"]
            ci = f"[{f['lo']:+.3f}, {f['hi']:+.3f}]" if "lo" in f else ""
            acc = "n/a" if row["rm_accuracy"] is None else f"{row['rm_accuracy']:.3f}"
            print(f"{name:18s} {row['epsilon']:5.2f} {row['epsilon_at_delta_1_over_n']:7.2f} "
                  f"{f['mean']:+.3f} {ci:23s} {row['sft']:+7.3f} {row['base']:+7.3f} {row['kl']:5.2f} {acc:>6s}  "
                  f"{share(row, 'share_own_sft'):20s} {share(row, 'share_vs_nonprivate_sft')}")
        print("dpalign privacy verify: " + ("every run verifies" if not unverified
                                            else f"FAILED for {', '.join(unverified)}"))
    return 1 if unverified else 0


if __name__ == "__main__":
    sys.exit(main())

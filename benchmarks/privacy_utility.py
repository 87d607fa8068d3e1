"""Privacy-utility table of the whole pipeline, like Table 1 of Wu et al. (2023).

Runs `dpalign run` on the embedded task for the non-private baseline and for the private preset at each target
epsilon, over several seeds (the data and base model are shared through the cache; the seed changes sampling,
noise, initialization and rollouts), and prints the mean gold reward of the final policy with a 95% interval
over seeds, next to the base and SFT models. It also reports, at each epsilon, the share of the non-private
gain over SFT that the private pipeline keeps (target at epsilon=4: >= 80%; Wu et al., GPT-2: about 90%).

    .venv/bin/python benchmarks/privacy_utility.py --json                       # the default grid
    .venv/bin/python benchmarks/privacy_utility.py --epsilons 4 --seeds 0 --config launch/configs/tiny.yaml

Extra ``key=value`` arguments are config overrides applied to every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_one(config: str, overrides: list[str], out_dir: Path) -> dict:
    from launch.config import load_config
    from launch.pipeline.pipeline import run_pipeline
    from launch.schema import RunConfig

    cfg = load_config(RunConfig, config, [*overrides, f"run.dir={out_dir}"])
    report = run_pipeline(cfg, progress=False)
    pols = report["evaluation"]["policies"]
    return {
        "run_dir": str(out_dir),
        "status": report["status"],
        "epsilon": (report.get("privacy") or {}).get("epsilon"),
        "gold": {name: pols[name]["gold_reward"]["mean"] for name in pols},
        "kl": pols["final"]["kl_to_sft"],
        "seconds": report["wall_time_s"]["total"],
    }


def summarize(rows: list[dict]) -> dict:
    from launch.pipeline.report import ci_entry

    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)
    table = {}
    for setting, rs in by.items():
        table[setting] = {
            "final": ci_entry([r["gold"]["final"] for r in rs]) if len(rs) > 1 else {"mean": rs[0]["gold"]["final"]},
            "sft": sum(r["gold"]["sft"] for r in rs) / len(rs),
            "base": sum(r["gold"]["base"] for r in rs) / len(rs),
            "kl": sum(r["kl"] for r in rs) / len(rs),
            "epsilon": max((r["epsilon"] or 0.0) for r in rs),
            "seeds": len(rs),
        }
    base = table.get("nonprivate")
    if base is not None:
        gain = base["final"]["mean"] - base["sft"]
        for row in table.values():
            own_gain = row["final"]["mean"] - row["sft"]
            row["share_of_nonprivate_gain"] = own_gain / gain if gain > 0 else None
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "launch" / "configs" / "demo.yaml"))
    ap.add_argument("--epsilons", default="1,2,4,8", help="comma-separated target epsilons of the private runs")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-privacy-utility"))
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()

    from launch.pipeline.pipeline import quiet_libraries

    quiet_libraries()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [("nonprivate", ["privacy.preset=nonprivate"])] + [
        (f"eps={e}", ["privacy.preset=private", f"privacy.target_epsilon={e}"]) for e in args.epsilons.split(",")
    ]
    rows, t0 = [], time.time()
    for name, extra in settings:
        for seed in seeds:
            out = Path(args.out) / f"{name}-seed{seed}"
            row = run_one(args.config, [*args.overrides, *extra, f"run.seed={seed}"], out)
            row.update(setting=name, seed=seed)
            rows.append(row)
            print(f"{name:12s} seed {seed}: final gold {row['gold']['final']:+.3f} (sft {row['gold']['sft']:+.3f}, "
                  f"base {row['gold']['base']:+.3f}) in {row['seconds']:.0f} s", file=sys.stderr)
    table = summarize(rows)
    result = {"config": args.config, "overrides": args.overrides, "seeds": seeds, "table": table, "runs": rows,
              "seconds": time.time() - t0}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'setting':12s} {'final gold (95% CI over seeds)':34s} {'SFT':>7s} {'base':>7s} {'KL':>7s} {'share':>7s}")
        for name, row in table.items():
            f = row["final"]
            ci = f"[{f['lo']:+.3f}, {f['hi']:+.3f}]" if "lo" in f else ""
            share = row.get("share_of_nonprivate_gain")
            print(f"{name:12s} {f['mean']:+.3f} {ci:26s} {row['sft']:+7.3f} {row['base']:+7.3f} {row['kl']:7.3f} "
                  f"{share if share is None else f'{share:7.2f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

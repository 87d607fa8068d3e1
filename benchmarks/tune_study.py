"""What a budget-allocation study buys and what it costs: its best public utility and its total epsilon, as JSON.

Runs `dpalign tune` (or, with --study-dir, reads a finished study) and prints one JSON object:

- ``best_public_utility``: the chosen trial's objective (study.metric, on public held-out data);
- ``released_utility``: the utility of what the study releases -- the final private run under public_proxy (the
  trials ran on a proxy population), the chosen trial itself under repeat_and_select and compose;
- ``study_epsilon`` / ``study_delta``: the study's total cost, recomputed from its ledger (``privacy verify``);
- ``epsilon_ratio_vs_one_trial``: study epsilon over the epsilon of the released run alone, both measured in the
  same study (what the search costs on top of one run: 1 under public_proxy);
- ``utility_ratio_vs_mean_trial``: the chosen trial's utility over the mean of the trials' (what the search buys
  over an arbitrary configuration from the same space);
- ``wall_s`` of the command when this script ran it.

    .venv/bin/python benchmarks/tune_study.py --config launch/configs/tune-demo.yaml [study.mode=...] [overrides]
    .venv/bin/python benchmarks/tune_study.py --study-dir studies/tune-demo-...
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def summarize(study_dir: Path) -> dict:
    from accounting.verify import verify_run

    report = json.loads((study_dir / "report.json").read_text())
    check = verify_run(study_dir)
    metric, best, mode = report["metric"], report["best"], report["mode"]
    rows = [r for r in report["trials"] if r["status"] == "completed"]
    if mode == "public_proxy":
        released, released_eps = report["final"][metric], report["final"]["epsilon"]
    else:
        released = best[metric] if best else None
        released_eps = best["epsilon"] if best else None
    mean_trial = statistics.fmean(r[metric] for r in rows) if rows else None
    return {
        "study_dir": str(study_dir),
        "mode": mode,
        "metric": metric,
        "best_public_utility": best[metric] if best else None,
        "released_utility": released,
        "chosen": best["overrides"] if best else None,
        "study_epsilon": report["privacy"]["epsilon"],
        "study_delta": report["privacy"]["delta"],
        "ledger_verifies": check.ok,
        "epsilon_ratio_vs_one_trial": report["privacy"]["epsilon"] / released_eps if released_eps else None,
        "utility_ratio_vs_mean_trial": best[metric] / mean_trial if best and mean_trial else None,
        "trial_epsilon": (report.get("plan") or {}).get("trial_target_epsilon"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "launch" / "configs" / "tune-demo.yaml"))
    parser.add_argument("--study-dir", default=None, help="summarize a finished study instead of running one")
    parser.add_argument("overrides", nargs="*", help="study overrides, e.g. study.mode=repeat_and_select")
    args = parser.parse_args()
    wall = None
    if args.study_dir:
        study_dir = Path(args.study_dir)
    else:
        t = time.time()
        proc = subprocess.run([sys.executable, "-m", "launch.cli", "tune", "--config", args.config,
                               *args.overrides, "--json", "--no-progress"], cwd=REPO, capture_output=True,
                              text=True)
        wall = time.time() - t
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode
        study_dir = Path(json.loads(proc.stdout.strip().splitlines()[-1])["study_dir"])
    print(json.dumps({**summarize(study_dir), "wall_s": wall}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

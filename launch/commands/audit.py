"""`dpalign audit --kind one-run`: a white-box one-run audit (Steinke, Nasr & Jagielski 2023) of the DP engine.

Plants m gradient canaries (each in the data with probability 1/2) as users of the REAL DP engine, runs the
configured schedule, scores each canary from the released updates, and turns the correct membership guesses into
a lower bound eps_lb at the stated confidence. Writes ``audit.json`` and ``audit.png`` in ``--out``.

How to read it: eps_lb <= claimed eps is consistent with the guarantee, not a proof of it (the attack may be
weak); eps_lb > claimed eps at the stated confidence means the mechanism or its accounting is broken.

The config (``--config``, keys listed by ``--help-config``) is the audit's own: canaries, the schedule under
audit (q, sigma, C, groups, steps, repeats), delta, confidence and seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from launch.commands._common import add_config_args, load_run_config


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="empirical privacy audit: a one-run white-box canary audit of the DP engine (eps lower bound)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.add_argument(
        "--kind",
        choices=["one-run"],
        default="one-run",
        help="one-run: white-box gradient canaries through the DP engine (exposure and mia need a finished run)",
    )
    parser.add_argument("--out", default="audit", help="directory for audit.json and audit.png (created)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    parser.set_defaults(func=main)


def plot(result: Any, path: Path) -> None:
    """Canary score histograms (in vs out) and the claimed eps next to eps_lb, verdict in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_scores, ax_eps) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
    scores, included = result.scores, result.included
    bins = 40
    ax_scores.hist(scores[~included], bins=bins, alpha=0.6, label="canary excluded")
    ax_scores.hist(scores[included], bins=bins, alpha=0.6, label="canary included")
    ax_scores.set_xlabel("canary score (log-likelihood ratio)")
    ax_scores.set_ylabel("canaries")
    ax_scores.legend()
    conf = f"{100 * result.audit.confidence:g}%"
    ax_eps.bar(
        ["claimed ε", f"ε_lb ({conf})"],
        [result.claimed.epsilon, result.audit.epsilon_lb],
        color=["tab:blue", "tab:red" if result.flagged else "tab:green"],
    )
    ax_eps.set_ylabel("ε")
    fig.suptitle(
        ("FLAGGED" if result.flagged else "consistent") + f": ε_lb={result.audit.epsilon_lb:.3f}, "
        f"claimed ε={result.claimed.epsilon:.3f} (δ={result.claimed.delta:g})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from trainers.audit.whitebox import WhiteboxAuditConfig

    cfg = load_run_config(args, WhiteboxAuditConfig)

    from launch.config import to_dict
    from trainers.audit.whitebox import run_whitebox_audit

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"dpalign audit: cannot create --out {out}: {err}", file=sys.stderr)
        return 2
    result = run_whitebox_audit(cfg)
    summary = {"kind": args.kind, "config": to_dict(cfg), **result.to_dict()}
    (out / "audit.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(result, out / "audit.png")
    if args.json:
        print(json.dumps(summary))
        return 0
    print(result.verdict)
    print(
        f"canaries {cfg.num_canaries}, guesses {result.audit.num_guesses}, correct {result.audit.num_correct}, "
        f"claimed eps {result.claimed.epsilon:.3f} ({result.claimed.accountant}, delta={result.claimed.delta:g}), "
        f"{result.seconds:.1f} s"
    )
    print(f"wrote {out / 'audit.json'} and {out / 'audit.png'}")
    return 0

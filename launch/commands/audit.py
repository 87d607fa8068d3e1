"""`dpalign audit`: empirical privacy audits of the DP engine, of a stage, and of a finished run.

Forms:

* ``dpalign audit [--kind one-run] [--config AUDIT.yaml] [key=value ...] [--out DIR]``: the white-box gradient-canary
  one-run audit of the DP engine (its own config; ``--help-config`` lists it).
* ``dpalign audit --kind one-run --stage sft|rm (--config RUN.yaml | --run RUN_DIR) [key=value ...]``: the black-box
  record-canary one-run audit: m canary users planted in the stage's private data (each with probability 1/2),
  the REAL stage recipe trained once with a real ledger, canaries scored by loss decrease, eps_lb vs the ledger.
* ``dpalign audit --run RUN_DIR --kind exposure|mia``: canary exposure of the run's DP-SFT model; loss and
  reference membership inference against its SFT and reward models (held-out users from the same generator).

Results go to ``audit.json`` (one entry per kind, merged) and ``audit.png`` in RUN_DIR (or ``--out``).

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
    add_config_args(parser, "the white-box audit's own config; with --stage, the run config")
    parser.add_argument(
        "--kind",
        choices=["one-run", "exposure", "mia"],
        default="one-run",
        help="one-run: canary one-run audit (white-box engine, or a stage with --stage); exposure, mia: need --run",
    )
    parser.add_argument("--run", default=None, help="a finished `dpalign run` directory (its config.yaml is used)")
    parser.add_argument(
        "--stage", choices=["sft", "rm"], default=None,
        help="one-run: black-box record canaries planted in this stage (config = a run config)",
    )
    parser.add_argument("--canaries", type=int, default=64, help="--stage: m, canary users (each in w.p. 1/2)")
    parser.add_argument("--seed", type=int, default=0, help="--stage: coins and secrets; exposure: candidates")
    parser.add_argument("--confidence", type=float, default=0.95, help="--stage, mia: confidence of bounds")
    parser.add_argument("--candidates", type=int, default=1000, help="exposure: random candidate secrets")
    parser.add_argument("--max-users", type=int, default=200, help="mia: members (and as many non-members)")
    parser.add_argument(
        "--out", default=None, help="directory for audit.json and audit.png (default: RUN_DIR with --run, else audit)"
    )
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
    if args.kind in ("exposure", "mia") or args.stage is not None:
        return _main_run(args)
    if args.run is not None:
        print("dpalign audit: --run with --kind one-run needs --stage sft|rm (the white-box audit has its own config)",
              file=sys.stderr)
        return 2
    args.out = args.out or "audit"
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


def _merge(out: Path, key: str, summary: dict[str, Any]) -> dict[str, Any]:
    """audit.json holds one entry per audit kind; a new audit replaces its own entry and keeps the others."""
    path = out / "audit.json"
    doc: dict[str, Any] = {}
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError:
            doc = {}
    if not isinstance(doc.get("audits"), dict):
        doc = {"audits": {}}
    doc["audits"][key] = summary
    verdicts = [a.get("verdict", "") for a in doc["audits"].values()]
    flagged = [k for k, a in doc["audits"].items() if a.get("flagged")]
    doc["flagged"] = bool(flagged)
    doc["verdict"] = (f"FLAGGED by {', '.join(flagged)}" if flagged else "consistent") + f" ({len(verdicts)} audits)"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def plot_run_audits(doc: dict[str, Any], path: Path) -> None:
    """One panel per audit in audit.json: claimed eps vs eps_lb, exposure (SFT vs base), AUC vs the DP bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    audits = doc["audits"]
    fig, axes = plt.subplots(1, len(audits), figsize=(4.5 * len(audits), 4), squeeze=False)
    for ax, (key, a) in zip(axes[0], audits.items(), strict=True):
        if a.get("kind") == "record-canary":
            claimed = a["claimed"]["epsilon"]
            conf = f"{100 * a['audit']['confidence']:g}%"
            ax.bar(["claimed ε", f"ε_lb ({conf})"], [claimed if claimed is not None else 0.0, a["audit"]["epsilon_lb"]],
                   color=["tab:blue", "tab:red" if a["flagged"] else "tab:green"])
            ax.set_title(f"{key}: canary AUC {a['auc']['auc']:.2f}" + ("" if claimed is not None else " (no claim)"))
        elif a.get("kind") == "exposure":
            sft = [c["sft"]["exposure"] for c in a["canaries"]]
            base = [c["base"]["exposure"] for c in a["canaries"]]
            x = range(len(sft))
            ax.bar([i - 0.2 for i in x], sft, width=0.4, label="SFT model")
            ax.bar([i + 0.2 for i in x], base, width=0.4, label="base model")
            ax.axhline(a["max_measurable_bits"], ls="--", c="gray", label="measurable max")
            ax.set_xlabel("canary")
            ax.set_ylabel("exposure (bits)")
            ax.legend(fontsize=7)
            ax.set_title(f"exposure (claimed ε={a['claimed']['epsilon']})")
        elif a.get("kind") == "mia":
            names, aucs, errs, bounds = [], [], [], []
            for stage, e in a["stages"].items():
                for att in e["attacks"]:
                    names.append(f"{stage}/{att['attack']}")
                    aucs.append(att["auc"])
                    errs.append([[att["auc"] - att["low"]], [att["high"] - att["auc"]]])
                    bounds.append(att["max_auc_under_claim"])
            for i, (auc, err) in enumerate(zip(aucs, errs, strict=True)):
                ax.errorbar(i, auc, yerr=err, fmt="o", c="tab:red" if auc > bounds[i] else "tab:blue")
                ax.plot([i - 0.3, i + 0.3], [bounds[i]] * 2, c="gray", ls="--")
            ax.axhline(0.5, c="black", lw=0.5)
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
            ax.set_ylim(0.0, 1.02)
            ax.set_ylabel("AUC (dashed: max under the claim)")
            ax.set_title("membership inference")
    fig.suptitle(doc["verdict"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _main_run(args: argparse.Namespace) -> int:
    """exposure / mia on --run, or the record-canary one-run audit of --stage."""
    from launch.run_audits import AuditRunError, exposure_audit, load_run, mia_audit

    if args.kind != "one-run" and args.stage is not None:
        print("dpalign audit: --stage is for --kind one-run", file=sys.stderr)
        return 2
    if args.kind in ("exposure", "mia") and args.run is None:
        print(f"dpalign audit: --kind {args.kind} needs --run RUN_DIR (a finished `dpalign run`)", file=sys.stderr)
        return 2
    if args.kind == "one-run" and (args.run is None) == (args.config is None):
        print("dpalign audit: --stage needs exactly one of --config RUN.yaml or --run RUN_DIR", file=sys.stderr)
        return 2
    try:
        if args.kind == "one-run":
            if args.run is not None:
                run_dir, _ = load_run(args.run)
                args.config = str(run_dir / "config.yaml")
            cfg = load_run_config(args)
            from trainers.audit.records import run_record_canary_audit

            result = run_record_canary_audit(cfg, stage=args.stage, m=args.canaries, seed=args.seed,
                                             confidence=args.confidence)
            key, summary = f"one-run-{args.stage}", {**result.to_dict(), "canaries_seed": args.seed}
        elif args.kind == "exposure":
            key, summary = "exposure", exposure_audit(args.run, num_candidates=args.candidates, seed=args.seed)
        else:
            key, summary = "mia", mia_audit(args.run, max_users=args.max_users, confidence=args.confidence)
    except (AuditRunError, ValueError) as err:
        print(f"dpalign audit: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or args.run or "audit")
    out.mkdir(parents=True, exist_ok=True)
    doc = _merge(out, key, summary)
    plot_run_audits(doc, out / "audit.png")
    if args.json:
        print(json.dumps(summary))
        return 0
    print(summary["verdict"])
    print(f"wrote {out / 'audit.json'} and {out / 'audit.png'}")
    return 0

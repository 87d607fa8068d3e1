"""`dpalign privacy epsilon|sigma|verify`: what a schedule costs, the noise for a budget, and re-checking a run.

Bad input gets one line on stderr and exit code 2; `verify` exits 1 when the report disagrees with the ledger.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

USAGE_ERROR = 2
MISMATCH = 1
DELTA_WARN_FACTOR = 0.1
"""Warn when delta > 0.1 / N: "well below 1/N" (delta = 1/N already lets a mechanism leak one user outright)."""


class _UsageError(Exception):
    pass


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "privacy", help="privacy accounting: epsilon of a schedule, sigma for a budget, verify a run's ledger"
    )
    sub = parser.add_subparsers(dest="privacy_command", metavar="ACTION")
    parser.set_defaults(func=main, privacy_command=None)

    def schedule_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sampling-rate", type=float, required=True, help="Poisson sampling rate q in (0, 1]")
        p.add_argument("--steps", type=int, required=True, help="number of sampled steps (>= 1)")
        p.add_argument("--delta", type=float, required=True, help="delta in (0, 1), well below 1/N")
        p.add_argument(
            "--repeats",
            type=int,
            default=1,
            help="K releases of each sample (PPO epochs); one event, sigma/sqrt(K)",
        )
        p.add_argument(
            "--num-users", type=int, default=None, help="dataset size N, to warn when delta >= 0.1/N"
        )
        p.add_argument("--json", action="store_true", help="print one JSON object")

    raw = argparse.RawDescriptionHelpFormatter
    eps = sub.add_parser(
        "epsilon", help="epsilon of a fixed schedule", formatter_class=raw,
        description="The (epsilon, delta) cost of a fixed DP-SGD schedule: `steps` Poisson-sampled releases at rate q, "
        "each with\nGaussian noise of multiplier sigma (K releases of one sample: --repeats K), composed by "
        "dp-accounting\n(PLD by default, tight; --accountant rdp for the RDP bound).",
        epilog="example (Abadi et al.'s MNIST schedule, 60k examples, batch 256, 60 epochs):\n"
        "  dpalign privacy epsilon --noise-multiplier 1.1 --sampling-rate 0.004267 --steps 14062 --delta 1e-5\n"
        "  -> epsilon = 2.38 at delta = 1e-05 (pld)",
    )
    eps.add_argument(
        "--noise-multiplier", type=float, required=True, help="effective noise multiplier sigma > 0"
    )
    schedule_args(eps)
    eps.add_argument(
        "--accountant", choices=("pld", "rdp"), default="pld", help="pld (tight, default) or rdp"
    )

    sig = sub.add_parser(
        "sigma", help="smallest noise multiplier whose epsilon is at most the target", formatter_class=raw,
        description="Calibrate the noise: the smallest multiplier sigma whose schedule (q, steps, repeats) costs at "
        "most the\ntarget epsilon at delta, by bisection over dp-accounting's epsilon (never overshoots the target).",
        epilog="example (a stage of 1200 users, 24 expected per step, 500 steps, epsilon 4):\n"
        "  dpalign privacy sigma --target-epsilon 4 --delta 8.3e-5 --sampling-rate 0.02 --steps 500 --num-users 1200",
    )
    sig.add_argument("--target-epsilon", type=float, required=True, help="target epsilon > 0")
    schedule_args(sig)
    sig.add_argument(
        "--accountant", choices=("pld", "rdp"), default="pld", help="pld (tight, default) or rdp"
    )
    sig.add_argument(
        "--max-noise-multiplier",
        type=float,
        default=100.0,
        help="largest sigma searched (error if not enough)",
    )

    ver = sub.add_parser("verify", help="recompute RUN_DIR/ledger.jsonl and compare with RUN_DIR/report.json")
    ver.add_argument("run_dir", metavar="RUN_DIR")
    ver.add_argument("--json", action="store_true", help="print one JSON object")


def _check_schedule(args: argparse.Namespace) -> None:
    if not (0.0 < args.sampling_rate <= 1.0):
        raise _UsageError(f"--sampling-rate must be in (0, 1], got {args.sampling_rate}")
    if not (0.0 < args.delta < 1.0):
        raise _UsageError(f"--delta must be in (0, 1), got {args.delta}")
    if args.steps < 1:
        raise _UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.repeats < 1:
        raise _UsageError(f"--repeats must be >= 1, got {args.repeats}")
    if args.num_users is not None:
        if args.num_users < 1:
            raise _UsageError(f"--num-users must be >= 1, got {args.num_users}")
        if args.delta > DELTA_WARN_FACTOR / args.num_users:
            print(
                f"dpalign privacy: warning: delta {args.delta:g} is not well below 1/N = {1 / args.num_users:.3g} "
                f"for N = {args.num_users} users; use delta <= {DELTA_WARN_FACTOR / args.num_users:.3g}",
                file=sys.stderr,
            )


def _emit(args: argparse.Namespace, payload: dict[str, Any], line: str) -> None:
    print(json.dumps(payload) if args.json else line)


def _epsilon(args: argparse.Namespace) -> int:
    from accounting.accountants import schedule_epsilon

    if not (args.noise_multiplier > 0.0) or math.isinf(args.noise_multiplier):
        raise _UsageError(f"--noise-multiplier must be a finite number > 0, got {args.noise_multiplier}")
    _check_schedule(args)
    result = schedule_epsilon(
        noise_multiplier=args.noise_multiplier,
        sampling_rate=args.sampling_rate,
        steps=args.steps,
        delta=args.delta,
        repeats=args.repeats,
        accountant=args.accountant,
    )
    payload = {
        "epsilon": result.epsilon,
        "delta": args.delta,
        "noise_multiplier": args.noise_multiplier,
        "accountant": result.accountant,
        "sampling_rate": args.sampling_rate,
        "steps": args.steps,
        "repeats": args.repeats,
        "pld_discretization": result.pld_discretization,
    }
    _emit(
        args,
        payload,
        f"epsilon = {result.epsilon:.4f} at delta = {args.delta:g} ({result.accountant} accountant; "
        f"sigma = {args.noise_multiplier:g}, q = {args.sampling_rate:g}, {args.steps} steps, K = {args.repeats})",
    )
    return 0


def _sigma(args: argparse.Namespace) -> int:
    from accounting.calibration import CalibrationError, calibrate_noise_multiplier

    if not (args.target_epsilon > 0.0) or math.isinf(args.target_epsilon):
        raise _UsageError(f"--target-epsilon must be a finite number > 0, got {args.target_epsilon}")
    if not (args.max_noise_multiplier > 0.0) or math.isinf(args.max_noise_multiplier):
        raise _UsageError(
            f"--max-noise-multiplier must be a finite number > 0, got {args.max_noise_multiplier}"
        )
    _check_schedule(args)
    try:
        cal = calibrate_noise_multiplier(
            target_epsilon=args.target_epsilon,
            delta=args.delta,
            sampling_rate=args.sampling_rate,
            steps=args.steps,
            repeats=args.repeats,
            accountant=args.accountant,
            max_noise_multiplier=args.max_noise_multiplier,
        )
    except CalibrationError as err:
        raise _UsageError(str(err)) from None
    payload = {
        "noise_multiplier": cal.noise_multiplier,
        "epsilon": cal.epsilon,
        "delta": cal.delta,
        "target_epsilon": cal.target_epsilon,
        "accountant": cal.accountant,
        "sampling_rate": cal.sampling_rate,
        "steps": cal.steps,
        "repeats": cal.repeats,
    }
    _emit(
        args,
        payload,
        f"sigma = {cal.noise_multiplier:.4f} gives epsilon = {cal.epsilon:.4f} <= {cal.target_epsilon:g} at "
        f"delta = {cal.delta:g} ({cal.accountant} accountant; q = {cal.sampling_rate:g}, {cal.steps} steps, "
        f"K = {cal.repeats})",
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from accounting.verify import VerifyInputError, verify_run

    try:
        result = verify_run(args.run_dir)
    except VerifyInputError as err:
        raise _UsageError(str(err)) from None
    rec = result.recomputed
    if args.json:
        print(
            json.dumps(
                {
                    "ok": result.ok,
                    "mismatches": result.mismatches,
                    "epsilon": rec["epsilon"],
                    "delta": rec["delta"],
                    "accountant": rec["accountant"],
                    "reported_epsilon": result.reported.get("epsilon"),
                    "torn_bytes": result.torn_bytes,
                }
            )
        )
    elif result.ok:
        print(
            f"OK: ledger gives epsilon = {rec['epsilon']:.6g} at delta = {rec['delta']:g} ({rec['accountant']} "
            f"accountant, {rec['composition']} composition, {rec['num_events']} events), as reported"
        )
    else:
        print(f"MISMATCH: report disagrees with ledger: {'; '.join(result.mismatches)}")
    return 0 if result.ok else MISMATCH


def main(args: argparse.Namespace) -> int:
    actions = {"epsilon": _epsilon, "sigma": _sigma, "verify": _verify}
    if args.privacy_command not in actions:
        print(
            "dpalign privacy: error: choose an action: epsilon, sigma or verify (see --help)", file=sys.stderr
        )
        return USAGE_ERROR
    try:
        return actions[args.privacy_command](args)
    except _UsageError as err:
        print(f"dpalign privacy {args.privacy_command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR

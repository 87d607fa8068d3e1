"""Accounting speed: epsilon for 100k steps whose sigma changes every 100 steps, and for a fixed schedule.

    .venv/bin/python benchmarks/accounting.py --json

A controller changes sigma as it goes, so the varied schedule is accounted the way an adaptive run is: RDP at the
filter order fixed before the run (docs/design.md section 2). The fixed schedule uses PLD. Both start from 100k
materialized PrivacyEvents (what a ledger holds) and include coalescing. Target (docs/design.md section 7): < 5 s for
the varied schedule. For reference, the varied schedule under dp-accounting's RdpAccountant at all default
orders can be timed with --reference (what coalescing alone would give; about 20-50 s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accounting.accountants import choose_rdp_order, coalesce, epsilon, schedule, to_dp_event  # noqa: E402
from accounting.events import PrivacyEvent  # noqa: E402

TARGET_S = 5.0
STEPS = 100_000
CHANGE_EVERY = 100
Q = 0.001
DELTA = 1e-5
SIGMA_MIN = 0.8


def varied_events() -> list[PrivacyEvent]:
    # sigma drifts smoothly in [0.8, 1.4], a new value every 100 steps: 1000 distinct mechanisms.
    return [
        PrivacyEvent(
            stage="ppo",
            step=i,
            purpose="gradient",
            sampling_rate=Q,
            noise_multiplier=1.1 + 0.3 * math.sin(i // CHANGE_EVERY),
        )
        for i in range(STEPS)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--reference", action="store_true", help="also time RdpAccountant at all default orders"
    )
    args = parser.parse_args()

    # The filter order is fixed before the run from the most aggressive schedule the controller may pick (its
    # lower sigma bound): an order tuned for a larger sigma makes the RDP of small-sigma steps explode.
    order = choose_rdp_order(schedule(noise_multiplier=SIGMA_MIN, sampling_rate=Q, steps=STEPS), delta=DELTA)
    events = varied_events()

    t0 = time.perf_counter()
    runs = coalesce(events)
    varied = epsilon(runs, delta=DELTA, accountant="rdp", rdp_order=order)
    varied_s = time.perf_counter() - t0

    fixed_events = [
        PrivacyEvent(stage="sft", step=i, purpose="gradient", sampling_rate=Q, noise_multiplier=1.1)
        for i in range(STEPS)
    ]
    t0 = time.perf_counter()
    fixed = epsilon(coalesce(fixed_events), delta=DELTA, accountant="pld")
    fixed_s = time.perf_counter() - t0

    result = {
        "steps": STEPS,
        "sigma_changes_every": CHANGE_EVERY,
        "distinct_mechanisms": len(runs),
        "sampling_rate": Q,
        "delta": DELTA,
        "varied": {"seconds": varied_s, "epsilon": varied.epsilon, "accountant": "rdp", "rdp_order": order},
        "fixed": {
            "seconds": fixed_s,
            "epsilon": fixed.epsilon,
            "accountant": "pld",
            "pld_discretization": fixed.pld_discretization,
        },
        "target_seconds": TARGET_S,
        "varied_ratio_to_target": varied_s / TARGET_S,
        "fixed_ratio_to_target": fixed_s / TARGET_S,
        "meets_target": varied_s < TARGET_S,
    }
    if args.reference:
        from dp_accounting.rdp import RdpAccountant

        t0 = time.perf_counter()
        ref = RdpAccountant().compose(to_dp_event(runs)).get_epsilon(DELTA)
        result["reference_all_orders_rdp"] = {"seconds": time.perf_counter() - t0, "epsilon": ref}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"varied: {varied_s:.2f} s (eps {varied.epsilon:.3f}, rdp order {order:g}; target {TARGET_S} s, "
            f"ratio {varied_s / TARGET_S:.2f}); fixed: {fixed_s:.2f} s (eps {fixed.epsilon:.3f}, pld)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

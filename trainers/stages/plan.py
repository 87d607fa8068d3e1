"""The privacy plan of a run, decided before any step from the config and the stages' user ids.

One place answers "what does each stage get?": the composition mode (parallel when no user is in two private
stages, sequential otherwise, never from a flag), each private stage's (epsilon, delta) target, each stage's public
schedule (q, steps, repeats), and the RDP filter's order. The pipeline and the record-canary audit both use it.
"""

from __future__ import annotations

from typing import Any

from accounting.accountants import schedule_epsilon
from accounting.calibration import calibrate_noise_multiplier
from trainers.stages.context import StageContext

STAGE_ORDER = ("sft", "rm", "ppo")
"""The stages in execution order (the stage seed is run.seed * 1000 + its index)."""


def plan_privacy(cfg: Any, stage_users: dict[str, set[str]]) -> dict[str, Any]:
    """Composition mode, run delta and per-stage (epsilon, delta) targets, from the config and the data.

    Raises:
        trainers.stages.config.CompositionError: private stages share users and no budget split is configured.
    """
    from trainers.stages.config import presets, resolve_composition, resolve_deltas, stage_targets

    privacy = cfg.privacy
    protection = presets(privacy.preset)
    mode = resolve_composition(privacy, stage_users)
    private = privacy.private_stages
    union = set().union(*(stage_users[s] for s in private)) if private else set()
    run_delta, deltas = resolve_deltas(
        privacy, mode=mode, stage_num_users={s: len(stage_users[s]) for s in private}, union_num_users=len(union)
    )
    targets = stage_targets(privacy, mode=mode)
    return {
        "protection": protection,
        "mode": mode,
        "run_delta": run_delta,
        "deltas": deltas,
        "targets": targets,
        "private": private,
    }


def stage_schedules(cfg: Any, stage_users: dict[str, set[str]]) -> dict[str, tuple[float, int, int]]:
    """(q, steps, repeats) of each stage's public schedule: fixed by the config and the number of users.

    Raises:
        trainers.stages.config.PlanError: a stage's schedule is impossible (q > 1), naming the field.
    """
    from trainers.stages.config import PlanError

    def schedule(name: str) -> tuple[float, int, int]:
        section, n = getattr(cfg, name), len(stage_users[name])
        try:
            q = section.sampling_rate(n)
        except PlanError as err:
            raise PlanError(f"{name}.{err}") from None
        if name == "ppo":
            return q, cfg.ppo.iterations, cfg.ppo.ppo_epochs
        return q, section.num_steps(n), 1

    return {name: schedule(name) for name in ("sft", "rm", "ppo")}


def plan_rdp_order(cfg: Any, plan: dict[str, Any], stage_schedules: dict[str, tuple[float, int, int]]) -> float:
    """The RDP filter's order, fixed before the run: the best order for the first private stage's planned
    schedule at its target (the other stages are calibrated at this same order)."""
    from accounting.accountants import choose_rdp_order, schedule
    from accounting.calibration import calibrate_noise_multiplier

    if cfg.privacy.rdp_order is not None:
        return float(cfg.privacy.rdp_order)
    first = plan["private"][0]
    q, steps, k = stage_schedules[first]
    cal = calibrate_noise_multiplier(
        target_epsilon=plan["targets"][first], delta=plan["deltas"][first], sampling_rate=q, steps=steps,
        repeats=k, accountant="rdp",
    )
    runs = schedule(noise_multiplier=cal.noise_multiplier, sampling_rate=q, steps=steps, repeats=k)
    return choose_rdp_order(runs, delta=plan["deltas"][first])


def calibrate_stage(ctx: StageContext, *, q: float, steps: int, repeats: int = 1) -> float:
    """sigma_eff for this stage's public schedule so that its epsilon is at most the stage target.

    Under the RDP privacy filter the calibration is made at the run's fixed order (the filter's), so every
    planned step is admitted; under PLD it is dp-accounting's PLD. Never overshoots.
    """
    if ctx.target_epsilon is None or ctx.target_delta is None:
        raise ValueError(f"stage {ctx.stage!r} is private but has no target (epsilon, delta)")
    ledger = ctx.ledger
    accountant = ledger.run.accountant if ledger is not None else ctx.cfg.privacy.accountant
    if accountant == "rdp" and ledger is not None:
        order = ledger.run.rdp_order
        return _calibrate_at_order(
            target=ctx.target_epsilon, delta=ctx.target_delta, q=q, steps=steps, repeats=repeats, order=order
        )
    cal = calibrate_noise_multiplier(
        target_epsilon=ctx.target_epsilon,
        delta=ctx.target_delta,
        sampling_rate=q,
        steps=steps,
        repeats=repeats,
        accountant=accountant,
    )
    return cal.noise_multiplier


def _calibrate_at_order(*, target: float, delta: float, q: float, steps: int, repeats: int, order: float) -> float:
    def eps(sigma: float) -> float:
        return schedule_epsilon(
            noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=delta, repeats=repeats,
            accountant="rdp", rdp_order=order,
        ).epsilon

    lo, hi = 0.05, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier <= 1e4 reaches epsilon {target} at RDP order {order}")
    for _ in range(60):
        mid = (lo + hi) / 2
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4 * hi:
            break
    assert eps(hi) <= target
    return hi

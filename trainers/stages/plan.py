"""The privacy plan of a run: every stage's (q, T, K, target epsilon, delta, sigma), decided once, before any step.

One module answers "where does sigma come from?": :func:`prepare_run` builds a frozen :class:`PrivacyPlan` from
the config and the stages' user ids -- the composition mode (parallel when no user is in two private stages,
sequential otherwise, never from a flag), each private stage's (epsilon, delta) target and budget share, each
stage's public schedule, the RDP filter's order, and each stage's calibrated noise multiplier. The pipeline, the
record-canary audit (``dpalign audit --kind one-run``) and Tune studies all call it; the recipes receive their
:class:`StagePlan` in ``StageContext.plan`` and never calibrate. The plan is written into the run directory
(``plan.json``) and the report (``privacy_plan``).

A recipe called directly (a test, a notebook) without ``ctx.plan`` asks :func:`stage_plan`, which plans that one
stage here, from the context's target and ledger: the calibration still happens in this module only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from accounting.calibration import calibrate_at_rdp_order, calibrate_noise_multiplier

STAGE_ORDER = ("sft", "rm", "ppo")
"""The stages in execution order (the stage seed is run.seed * 1000 + its index)."""


@dataclass(frozen=True)
class StagePlan:
    """One stage's plan, fixed before its first step (plain, picklable data: it travels to Ray Train workers).

    Attributes:
        stage: "sft", "rm" or "ppo".
        private: whether the stage runs the DP engine (the preset decides); reason: why, for the report.
        num_users: N, the stage's distinct users (public: the accountant's q and B = q * N use it).
        sampling_rate, steps, repeats: the public schedule (q, T, K; K > 1 only for PPO epochs over one sample).
        target_epsilon, delta: the stage's budget (None when not private).
        noise_multiplier: sigma_eff of every step, calibrated so the stage's epsilon over the planned schedule is
            at most its target (None when not private).
        accountant, rdp_order, composition: how the run's ledger accounts (the filter's order under RDP).
    """

    stage: str
    private: bool
    num_users: int
    sampling_rate: float
    steps: int
    repeats: int = 1
    reason: str = ""
    target_epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    accountant: str | None = None
    rdp_order: float | None = None
    composition: str | None = None

    @property
    def expected_batch_users(self) -> float:
        return self.sampling_rate * self.num_users

    def check_schedule(self, *, num_users: int, sampling_rate: float, steps: int, repeats: int = 1) -> None:
        """Refuse a stage whose data or schedule is not the one this plan was made for (its sigma would not be
        calibrated for what runs)."""
        planned = (self.num_users, self.sampling_rate, self.steps, self.repeats)
        actual = (num_users, sampling_rate, steps, repeats)
        if planned != actual:
            raise ValueError(
                f"stage {self.stage!r}: the privacy plan was made for (N, q, T, K) = {planned} but the stage has "
                f"{actual}; plan the run from the data it trains on (trainers.stages.plan.prepare_run)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PrivacyPlan:
    """The whole run's plan: the run's budget, how it composes, and one :class:`StagePlan` per stage.

    Attributes:
        target_epsilon, delta: the run's (epsilon, delta) (delta: the configured one, or the default for N).
        accountant: "rdp" or "pld"; rdp_order: the RDP filter's order (None under PLD).
        composition: "parallel" (user-disjoint private stages) or "sequential".
        stages: the stage plans in :data:`STAGE_ORDER`.
    """

    target_epsilon: float
    delta: float
    accountant: str
    rdp_order: float | None
    composition: str
    stages: tuple[StagePlan, ...]

    def __getitem__(self, stage: str) -> StagePlan:
        for s in self.stages:
            if s.stage == stage:
                return s
        raise KeyError(stage)

    @property
    def private(self) -> tuple[str, ...]:
        return tuple(s.stage for s in self.stages if s.private)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stages"] = {s.stage: s.to_dict() for s in self.stages}
        return out


def calibrate_sigma(
    *, target_epsilon: float, delta: float, sampling_rate: float, steps: int, repeats: int, accountant: str,
    rdp_order: float | None,
) -> float:
    """THE calibration of a stage's sigma_eff: the smallest multiplier whose epsilon over the planned schedule is at
    most the target. Under the RDP filter it is made at the run's fixed order (the filter's), so every planned
    step is admitted; under PLD it is dp-accounting's PLD. Never overshoots."""
    if accountant == "rdp" and rdp_order is not None:
        return calibrate_at_rdp_order(
            target_epsilon=target_epsilon, delta=delta, sampling_rate=sampling_rate, steps=steps, repeats=repeats,
            order=rdp_order,
        )
    return calibrate_noise_multiplier(
        target_epsilon=target_epsilon, delta=delta, sampling_rate=sampling_rate, steps=steps, repeats=repeats,
        accountant=accountant,
    ).noise_multiplier


def plan_stage(
    stage: str, *, private: bool, num_users: int, sampling_rate: float, steps: int, repeats: int = 1,
    reason: str = "", target_epsilon: float | None = None, delta: float | None = None, accountant: str | None = None,
    rdp_order: float | None = None, composition: str | None = None,
) -> StagePlan:
    """One stage's plan; a private stage's sigma is calibrated here (:func:`calibrate_sigma`)."""
    sigma = None
    if private:
        if target_epsilon is None or delta is None or accountant is None:
            raise ValueError(f"stage {stage!r} is private but has no target (epsilon, delta) or accountant")
        sigma = calibrate_sigma(
            target_epsilon=target_epsilon, delta=delta, sampling_rate=sampling_rate, steps=steps, repeats=repeats,
            accountant=accountant, rdp_order=rdp_order,
        )
    return StagePlan(
        stage=stage, private=private, num_users=num_users, sampling_rate=sampling_rate, steps=steps,
        repeats=repeats, reason=reason, target_epsilon=target_epsilon if private else None,
        delta=delta if private else None, noise_multiplier=sigma, accountant=accountant if private else None,
        rdp_order=rdp_order if private else None, composition=composition if private else None,
    )


def prepare_run(cfg: Any, stage_users: Mapping[str, set[str]]) -> PrivacyPlan:
    """The run's frozen privacy plan, from the config and each stage's user ids (before any privacy is spent).

    Raises:
        trainers.stages.config.CompositionError: private stages share users and no budget split is configured.
        trainers.stages.config.PlanError: a stage's schedule is impossible (q > 1), naming the field.
    """
    budget = plan_privacy(cfg, stage_users)
    schedules = stage_schedules(cfg, stage_users)
    accountant = cfg.privacy.accountant
    order = plan_rdp_order(cfg, budget, schedules) if budget["private"] and accountant == "rdp" else None
    stages = []
    for name in STAGE_ORDER:
        q, steps, repeats = schedules[name]
        protection = budget["protection"][name]
        stages.append(plan_stage(
            name, private=protection.private, reason=protection.reason, num_users=len(stage_users[name]),
            sampling_rate=q, steps=steps, repeats=repeats, target_epsilon=budget["targets"].get(name),
            delta=budget["deltas"].get(name), accountant=accountant, rdp_order=order, composition=budget["mode"],
        ))
    return PrivacyPlan(
        target_epsilon=float(cfg.privacy.target_epsilon), delta=float(budget["run_delta"]), accountant=accountant,
        rdp_order=order, composition=budget["mode"], stages=tuple(stages),
    )


def stage_plan(ctx: Any, *, num_users: int, sampling_rate: float, steps: int, repeats: int = 1) -> StagePlan:
    """The plan a recipe runs under: ``ctx.plan`` checked against the stage's data and schedule, or, for a recipe
    called directly without one, this stage planned from the context's target and ledger (and set as ``ctx.plan``,
    so the learners -- in this process or on Ray Train workers, where there is no ledger -- see the same plan).

    Raises:
        ValueError: the plan was made for other data or another schedule; a private context without a target;
            a plan whose accounting differs from the ledger it will write to.
    """
    plan = getattr(ctx, "plan", None)
    ledger = ctx.ledger
    if plan is None:
        accountant = ledger.run.accountant if ledger is not None else ctx.cfg.privacy.accountant
        order = ledger.run.rdp_order if ledger is not None and accountant == "rdp" else None
        plan = plan_stage(
            ctx.stage, private=ctx.private, num_users=num_users, sampling_rate=sampling_rate, steps=steps,
            repeats=repeats, target_epsilon=ctx.target_epsilon, delta=ctx.target_delta, accountant=accountant,
            rdp_order=order, composition=ledger.run.composition if ledger is not None else None,
        )
        ctx.plan = plan
    if plan.stage != ctx.stage or plan.private != ctx.private:
        raise ValueError(f"stage {ctx.stage!r} (private={ctx.private}) was given the plan of {plan.stage!r} "
                         f"(private={plan.private})")
    plan.check_schedule(num_users=num_users, sampling_rate=sampling_rate, steps=steps, repeats=repeats)
    if plan.private and ledger is not None and (plan.accountant, plan.rdp_order) != (
        ledger.run.accountant, ledger.run.rdp_order if ledger.run.accountant == "rdp" else None
    ):
        raise ValueError(
            f"stage {ctx.stage!r}: planned under ({plan.accountant}, order {plan.rdp_order}) but the ledger accounts "
            f"with ({ledger.run.accountant}, order {ledger.run.rdp_order})"
        )
    return plan


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

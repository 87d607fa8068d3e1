"""The safety layer: whatever the actor proposes, the stage finishes its planned steps within (epsilon, delta).

Accounting. The controller chooses sigma from earlier outputs, so composition is adaptive; the budget is an RDP
privacy filter at ONE order fixed before the run (Feldman & Zrnic 2021; docs/design.md section 2 "Adaptivity"). The
order is the optimal one for the fixed schedule that spends the budget in the planned steps. RDP at a fixed order
composes by addition, so the history is a single number (sum of per-event RDP from dp-accounting) and the floor
search evaluates candidate proposals on that sum plus the proposal, never on a mutated accountant.

Floor. With n steps left (this one included) and history RDP r_h, the floor is the smallest sigma with

    eps_alpha(r_h + n * rdp_alpha(q, sigma)) <= target

If every step runs at sigma >= floor_t, then after it r_h grew by at most rdp_alpha(q, floor_t), so the next floor
is at most floor_t and the remaining n - 1 steps are still affordable: the invariant that makes "the planned steps
always finish" a theorem rather than a hope (tested with adversarial proposals in
tests/controller/test_ctrl_budget.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from accounting.accountants import check_delta, mechanism_rdp, rdp_epsilon_at_order
from accounting.events import PrivacyEvent
from accounting.tuning import trial_rdp_bound
from controller.records import LedgerState

MIN_SIGMA = 1e-3
FLOOR_REL_TOL = 1e-4
CANDIDATE_ORDERS: tuple[float, ...] = (
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
    6.0,
    8.0,
    10.0,
    12.0,
    16.0,
    20.0,
    24.0,
    32.0,
    48.0,
    64.0,
    128.0,
    256.0,
)
"""Orders searched for the filter (a subset of dp-accounting's defaults)."""


class BudgetExhausted(RuntimeError):
    """Even the largest allowed sigma cannot run the remaining steps within budget (spent by other releases)."""


@dataclass(frozen=True)
class SafeAction:
    """A step's clip thresholds and noise multiplier after the budget layer.

    Attributes:
        clip_norms: C_k per group (unchanged by the budget layer: thresholds do not change the privacy cost).
        noise_multiplier: sigma_eff of the step, >= the floor.
        proposed: the sigma the actor proposed.
        floor: the floor at this step.
        fell_back: True when the ledger's filter refused the proposal and the floor was used.
    """

    clip_norms: tuple[float, ...]
    noise_multiplier: float
    proposed: float
    floor: float
    fell_back: bool


@dataclass(frozen=True)
class SpendMark:
    """The guard's spending at one moment (public bookkeeping): what a decision interval's reward is measured from."""

    epsilon: float
    budget_share: float
    steps: int


class BudgetGuard:
    """Tracks a stage's spent RDP at a fixed order and turns proposals into affordable steps.

    Args:
        target_epsilon, delta: the stage's budget.
        sampling_rate: Poisson rate q of every step.
        steps: planned steps of the stage.
        repeats: releases per sample (PPO epochs); the step's event has multiplier sigma / sqrt(repeats).
        rdp_order: the filter's order; None picks the optimal order for the fixed schedule (before the run).
        max_noise_multiplier: sigma never exceeds this (a proposal above it is clamped).
        admit: the ledger filter's ``admit(event) -> bool`` (optional); a refused proposal falls back to the floor.
        stage: stage name written into proposed events.
    """

    def __init__(
        self,
        *,
        target_epsilon: float,
        delta: float,
        sampling_rate: float,
        steps: int,
        repeats: int = 1,
        rdp_order: float | None = None,
        max_noise_multiplier: float = 100.0,
        admit: Callable[[PrivacyEvent], bool] | None = None,
        stage: str = "stage",
    ) -> None:
        check_delta(delta)
        if not (target_epsilon > 0) or math.isinf(target_epsilon):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
        if not (0 < sampling_rate <= 1):
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps}")
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.sampling_rate = float(sampling_rate)
        self.steps = int(steps)
        self.repeats = int(repeats)
        self.max_noise_multiplier = float(max_noise_multiplier)
        self.admit = admit
        self.stage = stage
        self._history_rdp = 0.0
        self._events: list[PrivacyEvent] = []
        self.steps_done = 0
        if rdp_order is None:
            # The order whose floor for the whole plan is smallest: the fixed schedule's optimal order, chosen
            # before any release (dp-accounting's default-order calibration costs ~0.7 s; this ~30 ms).
            best = None
            for order in CANDIDATE_ORDERS:
                self.rdp_order = order
                try:
                    f = self.floor()
                except BudgetExhausted:
                    continue
                if best is None or f < best[0]:
                    best = (f, order)
            if best is None:
                raise BudgetExhausted(
                    f"no noise multiplier <= {max_noise_multiplier:g} runs {steps} steps at q={sampling_rate:g} "
                    f"within epsilon {target_epsilon:g}; raise the target or max_noise_multiplier"
                )
            rdp_order = best[1]
        self.rdp_order = float(rdp_order)
        self.sigma_reference = self.floor()
        self.sigma_current = self.sigma_reference
        # The stage's RDP budget at this order (what budget_share divides by): the largest RDP the filter admits.
        self._rdp_budget = trial_rdp_bound(target_epsilon=self.target_epsilon, delta=self.delta, order=self.rdp_order)

    # --- accounting on a copy of the history, never mutating it -------------------------------------------
    def _rdp(self, sigma: float) -> float:
        return mechanism_rdp(
            sampling_rate=self.sampling_rate,
            composed_noise_multiplier=sigma / math.sqrt(self.repeats),
            order=self.rdp_order,
        )

    def _epsilon_of(self, rdp: float) -> float:
        return rdp_epsilon_at_order(rdp, order=self.rdp_order, delta=self.delta)

    def epsilon_spent(self) -> float:
        """Epsilon of the history under the filter's order (0 before the first event)."""
        return self._epsilon_of(self._history_rdp) if self._events else 0.0

    def budget_share(self) -> float:
        """Share of the stage's RDP budget (at the filter's order) the history has spent: additive across steps, so
        every step at the reference sigma costs 1/steps of it."""
        return self._history_rdp / self._rdp_budget

    def mark(self) -> SpendMark:
        """Epsilon, budget share and steps spent so far."""
        return SpendMark(self.epsilon_spent(), self.budget_share(), self.steps_done)

    @property
    def steps_left(self) -> int:
        return max(self.steps - self.steps_done, 0)

    def affordable(self, sigma: float, *, steps: int | None = None) -> bool:
        """Whether running ``steps`` (default: all remaining) more steps at ``sigma`` stays within budget."""
        n = self.steps_left if steps is None else steps
        if n == 0:
            return True
        return self._epsilon_of(self._history_rdp + n * self._rdp(sigma)) <= self.target_epsilon

    def floor(self) -> float:
        """Smallest sigma (relative tolerance FLOOR_REL_TOL, rounded up) affording every remaining step.

        Raises:
            BudgetExhausted: when even ``max_noise_multiplier`` cannot.
        """
        if self.steps_left == 0:
            return MIN_SIGMA
        hi = self.max_noise_multiplier
        if not self.affordable(hi):
            raise BudgetExhausted(
                f"{self.steps_left} steps left but even sigma={hi:g} exceeds epsilon {self.target_epsilon:g} "
                f"(spent {self.epsilon_spent():.4g}): releases outside the controller used the budget; raise "
                "max_noise_multiplier or the target epsilon"
            )
        lo = MIN_SIGMA
        if self.affordable(lo):
            return lo
        while hi / lo > 1.0 + FLOOR_REL_TOL:
            mid = math.sqrt(lo * hi)
            if self.affordable(mid):
                hi = mid
            else:
                lo = mid
        return hi

    # --- proposals ----------------------------------------------------------------------------------------
    def event(self, sigma: float, *, step: int | None = None) -> PrivacyEvent:
        return PrivacyEvent(
            stage=self.stage,
            step=self.steps_done if step is None else step,
            purpose="gradient",
            sampling_rate=self.sampling_rate,
            noise_multiplier=sigma,
            repeats=self.repeats,
        )

    def safe_action(self, *, clip_norms: Iterable[float], sigma: float) -> SafeAction:
        """Clamp sigma into [floor, max_noise_multiplier] (the floor itself at the last step, which then spends
        the whole remaining budget); fall back to the floor when the ledger refuses."""
        if self.steps_left == 0:
            raise BudgetExhausted(f"all {self.steps} planned steps already ran; the stage must stop")
        floor = self.floor()
        proposed = float(sigma)
        s = proposed if math.isfinite(proposed) else floor
        s = min(max(s, floor), self.max_noise_multiplier)
        if self.steps_left == 1:
            # Budget left after the last step is wasted: the last step spends exactly what remains.
            s = floor
        fell_back = False
        if self.admit is not None and not self.admit(self.event(s)):
            fell_back = True
            s = floor
            if not self.admit(self.event(s)):
                raise BudgetExhausted(f"the ledger's filter refuses even the floor sigma={floor:.5g}")
        return SafeAction(tuple(float(c) for c in clip_norms), s, proposed, floor, fell_back)

    def record(self, event: PrivacyEvent) -> None:
        """Add a released step's event (from the engine's record) to the history; a gradient event is a step."""
        if event.sampling_rate != self.sampling_rate and event.purpose == "gradient":
            raise ValueError(
                f"event sampling rate {event.sampling_rate} differs from the guard's {self.sampling_rate}"
            )
        self._history_rdp += mechanism_rdp(
            sampling_rate=event.sampling_rate,
            composed_noise_multiplier=event.composed_noise_multiplier,
            order=self.rdp_order,
        )
        self._events.append(event)
        if event.purpose == "gradient":
            self.steps_done += 1
            self.sigma_current = event.noise_multiplier

    def ledger_state(self) -> LedgerState:
        """The controller's view of the ledger (public bookkeeping only)."""
        return LedgerState(
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            epsilon_spent=self.epsilon_spent(),
            steps_done=self.steps_done,
            steps_total=self.steps,
            sigma_floor=self.floor() if self.steps_left else self.sigma_current,
            sigma_reference=self.sigma_reference,
            sigma_current=self.sigma_current,
        )

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        return tuple(self._events)

    def state_dict(self) -> dict:
        return {
            "rdp_order": self.rdp_order,
            "events": [e.to_dict() for e in self._events],
            "sigma_reference": self.sigma_reference,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint: replays the events (nothing rolled back, see docs/design.md section 2 "Ledger")."""
        if float(state["rdp_order"]) != self.rdp_order:
            raise ValueError(
                f"checkpoint's RDP order {state['rdp_order']} differs from this guard's {self.rdp_order}: the "
                "filter order must stay fixed for the whole run"
            )
        self._history_rdp, self._events, self.steps_done = 0.0, [], 0
        self.sigma_current = self.sigma_reference = float(state["sigma_reference"])
        for e in state["events"]:
            self.record(PrivacyEvent(**e))

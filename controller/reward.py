"""The controller's reward for one decision interval, shared by private runs and the proxy pretraining episodes.

Two forms (``controller.reward``):

``validation_gain`` (default)
    ``scale * (L_prev - L) / L_0``: the relative decrease of the PUBLIC validation loss over the interval. It
    rewards utility only; the budget layer decides what the interval may spend.

``gain_per_budget`` (RLDP's reward: utility gained per unit of privacy spent)
    the same gain divided by the interval's share of the stage's RDP budget, relative to the share an even pace
    spends (``interval / steps``): an interval that bought the gain with half the even pace's budget earns twice
    the reward. The share is measured in RDP at the filter's order, which is additive across steps, so equal
    steps at the reference sigma cost equal shares (epsilon is not: it grows like the square root of the steps,
    which would make late intervals look cheap). A loss increase bought with little budget is penalised as much
    as it is rewarded when gained.

Both subtract ``privacy_penalty * (epsilon spent in the interval / target)`` (0 by default). Every input is public or
accounted bookkeeping: the public validation loss and the ledger's own spending.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from controller.budget import BudgetGuard, SpendMark

RewardKind = Literal["validation_gain", "gain_per_budget"]
"""The type of ``controller.reward`` and ``controller.env.reward`` (one list of names for both and the checks)."""
REWARD_KINDS: tuple[str, ...] = get_args(RewardKind)

# An interval's budget share never counts as less than this fraction of the even pace: the largest sigma the
# budget layer allows bounds it from below anyway; the clamp keeps a degenerate (zero-cost) interval finite.
MIN_PACE_FRACTION = 1e-3


def interval_reward(
    *,
    kind: str,
    previous_loss: float,
    loss: float,
    initial_loss: float,
    scale: float,
    budget_share: float,
    pace_share: float,
    epsilon_share: float = 0.0,
    privacy_penalty: float = 0.0,
) -> float:
    """Reward of one interval.

    Args:
        kind: ``validation_gain`` or ``gain_per_budget``.
        previous_loss, loss: public validation loss at the interval's start and end.
        initial_loss: public validation loss before the first step (normalizes across tasks).
        scale: ``controller.reward_scale``.
        budget_share: share of the stage's RDP budget the interval spent.
        pace_share: share an even pace spends in the same number of steps (steps in the interval / planned steps).
        epsilon_share: epsilon spent in the interval over the target (for ``privacy_penalty``).
        privacy_penalty: ``controller.privacy_penalty``.
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"controller.reward={kind!r}: must be one of {', '.join(REWARD_KINDS)}")
    gain = scale * (previous_loss - loss) / initial_loss
    if kind == "gain_per_budget":
        if not pace_share > 0:
            raise ValueError(f"pace_share must be > 0, got {pace_share}")
        gain *= pace_share / max(budget_share, MIN_PACE_FRACTION * pace_share)
    return gain - privacy_penalty * epsilon_share


def reward_since(
    mark: SpendMark, guard: BudgetGuard, *, config: Any, previous_loss: float, loss: float, initial_loss: float
) -> float:
    """The reward of the interval since ``mark`` (taken with ``guard.mark()`` at its start), as ``config`` (a
    ControllerConfig or ProxyEnvConfig: ``reward``, ``reward_scale``, ``privacy_penalty``) defines it."""
    now = guard.mark()
    return interval_reward(
        kind=config.reward,
        previous_loss=previous_loss,
        loss=loss,
        initial_loss=initial_loss,
        scale=config.reward_scale,
        budget_share=now.budget_share - mark.budget_share,
        pace_share=(now.steps - mark.steps) / guard.steps,
        epsilon_share=(now.epsilon - mark.epsilon) / guard.target_epsilon,
        privacy_penalty=config.privacy_penalty,
    )

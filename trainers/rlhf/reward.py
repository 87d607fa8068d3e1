"""Reward-model objective: the Bradley-Terry pairwise loss, per record, and pairwise accuracy.

A preference record is (prompt, chosen, rejected). Bradley-Terry models P(chosen > rejected) =
sigmoid(s(chosen) - s(rejected)) for a scalar score s, and the loss is the negative log-likelihood
-log sigmoid(s_c - s_r) (InstructGPT, TRL's RewardTrainer). Each record's loss depends only on its own two
scores; both sequences of a pair belong to the same user, so a pair is one record for the engine.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def _check_pair(score_chosen: Tensor, score_rejected: Tensor) -> None:
    if score_chosen.dim() != 1 or score_chosen.shape != score_rejected.shape:
        raise ValueError(
            "score_chosen and score_rejected must both be [R]; got "
            f"{tuple(score_chosen.shape)} and {tuple(score_rejected.shape)}"
        )


def bradley_terry_loss_per_record(score_chosen: Tensor, score_rejected: Tensor) -> Tensor:
    """-log sigmoid(s_chosen - s_rejected) per record.

    ``logsigmoid`` is used rather than ``log(sigmoid(.))`` because the latter underflows to -inf for a large
    negative margin; its gradient wrt s_chosen is -sigmoid(s_r - s_c) = -(1 - sigmoid(margin)), bounded by 1, so
    a mis-ordered pair never produces an unbounded gradient before clipping.

    Args:
        score_chosen: [R] scores of the preferred responses.
        score_rejected: [R] scores of the other responses.

    Returns:
        [R] loss per record (no reduction).
    """
    _check_pair(score_chosen, score_rejected)
    return -F.logsigmoid(score_chosen - score_rejected)  # [R]


def pairwise_correct(score_chosen: Tensor, score_rejected: Tensor) -> Tensor:
    """1.0 where the chosen response scores strictly higher, else 0.0 (a tie counts as wrong).

    Returns:
        [R] float. Its mean is the pairwise accuracy; compute that mean only on held-out (gold-labelled,
        non-private) pairs, or release it with noise: on private training pairs it is a private statistic.
    """
    _check_pair(score_chosen, score_rejected)
    return (score_chosen > score_rejected).float()  # [R]


def pairwise_accuracy(score_chosen: Tensor, score_rejected: Tensor) -> float:
    """Fraction of pairs ordered correctly (see ``pairwise_correct`` for which data it may be computed on)."""
    correct = pairwise_correct(score_chosen, score_rejected)
    if correct.numel() == 0:
        raise ValueError("pairwise_accuracy needs at least one pair")
    return float(correct.mean())

"""A tiny seeded corpus of review-like sentences for the model tests (the real generator lives in trainers/data)."""

from __future__ import annotations

import random

_SUBJECTS = [
    "the film",
    "this movie",
    "the plot",
    "the acting",
    "the score",
    "the director",
    "the cast",
    "the ending",
]
_VERBS = ["was", "felt", "seemed", "looked", "sounded", "became"]
_ADJ = ["wonderful", "boring", "brilliant", "awful", "moving", "slow", "clever", "dull", "great", "terrible"]
_TAILS = ["from start to finish", "in every scene", "at times", "for me", "overall", "by the end"]


def review_corpus(n: int, *, seed: int) -> list[str]:
    """``n`` short reviews of 1-3 sentences with a learnable structure (subject verb adjective tail)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        sentences = [
            f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_ADJ)} {rng.choice(_TAILS)}."
            for _ in range(rng.randint(1, 3))
        ]
        texts.append(" ".join(sentences))
    return texts

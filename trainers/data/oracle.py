"""The gold sentiment oracle: VADER's compound score in [-1, 1].

It plays the human labeler of the embedded task (Bradley-Terry labels for D2 preference pairs) and is the final
evaluation metric (mean gold reward of policy continuations). Training never reads it otherwise: a stage that
optimized the oracle directly would not be learning from private human feedback.

VADER (Hutto & Gilbert 2014) is a lexicon-and-rules scorer; its lexicon ships inside the ``vaderSentiment``
package, so the oracle works offline. The analyzer is built once per process (loading the lexicon takes ~10 ms
and the object is read-only afterwards).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any


@functools.lru_cache(maxsize=1)
def _analyzer() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def lexicon() -> dict[str, float]:
    """VADER's word -> valence lexicon (read-only use: the generator's word lists are tested against it)."""
    return _analyzer().lexicon


def gold_reward(texts: Iterable[str]) -> list[float]:
    """VADER compound score of each text, in [-1, 1] (positive means positive sentiment)."""
    analyzer = _analyzer()
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i}: expected a string, got {type(text).__name__}")
        out.append(float(analyzer.polarity_scores(text)["compound"]))
    return out

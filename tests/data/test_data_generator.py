"""The review generator: deterministic, rich, and tracked by the VADER oracle."""

from __future__ import annotations

import random
import re

import pytest

from trainers.data import generator as g
from trainers.data.oracle import gold_reward, lexicon
from trainers.data.task import distinct_words

NEUTRAL_LISTS = (
    "FIRST_NAMES",
    "_SURNAME_HEADS",
    "_SURNAME_TAILS",
    "TITLE_ADJ",
    "TITLE_NOUNS",
    "PLACES",
    "ASPECTS",
    "FILM_NOUNS",
    "NEUTRAL_ADJ",
    "OCCASIONS",
    "COMPANIONS",
    "AUDIENCES",
    "TIME_POINTS",
    "WHEN",
    "RELATIVES",
    "MINUTES",
    "SCORES_WORDS",
    "FAVOURITE_PHRASES",
    "SIGNOFFS",
    "HEDGES",
    "POS_FLAVOUR",
    "NEG_FLAVOUR",
)
SIGNED_LISTS = (
    ("POS_ADJ", 1),
    ("NEG_ADJ", -1),
    ("POS_VERBS", 1),
    ("NEG_VERBS", -1),
    ("POS_NOUNS", 1),
    ("NEG_NOUNS", -1),
    ("POS_FEEL", 1),
    ("NEG_FEEL", -1),
    ("POS_MANNER", 1),
    ("NEG_MANNER", -1),
    ("POS_1P_VERBS", 1),
    ("NEG_1P_VERBS", -1),
    ("POS_REACTIONS", 1),
    ("NEG_REACTIONS", -1),
)


def _reviews(n: int, *, seed: int, sentiment: float | None = None) -> list[g.Review]:
    gen = g.ReviewGenerator(seed=seed, catalogue_size=300)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        style = gen.style(rng, public=True)
        s = rng.uniform(-1, 1) if sentiment is None else sentiment
        out.append(gen.review(rng, style=style, sentiment=s))
    return out


def test_same_seed_same_text_different_seed_different():
    a = [r.text for r in _reviews(50, seed=3)]
    assert a == [r.text for r in _reviews(50, seed=3)]
    b = [r.text for r in _reviews(50, seed=4)]
    assert sum(x != y for x, y in zip(a, b, strict=True)) >= 45


def test_does_not_touch_global_random_state():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    _reviews(20, seed=0)
    assert random.random() == expected


def test_diversity_words_shapes_and_length():
    reviews = _reviews(2000, seed=0)
    texts = [r.text for r in reviews]
    assert distinct_words(texts) >= 2000
    shapes = {s for r in reviews for s in r.shapes}
    assert len(shapes) >= 50, sorted(shapes)
    assert sum(len(r.sentences) for r in reviews) / len(reviews) >= 3.0
    assert len(set(texts)) == len(texts)  # no duplicate reviews
    # Sentence structure varies: questions, exclamations, contrastive and subordinate clauses all occur.
    joined = " ".join(texts)
    for marker in ("?", "!", ", but ", "Although ", "Because ", " than ", "; "):
        assert marker in joined, marker


def test_word_lists_agree_with_the_vader_lexicon():
    lex = lexicon()
    for name in NEUTRAL_LISTS:
        tokens = {t for item in getattr(g, name) for t in re.findall(r"[a-z'-]+", item.lower())}
        assert not tokens & set(lex), f"{name} has VADER words: {sorted(tokens & set(lex))}"
    for genre, spec in g.GENRES.items():
        for key, items in spec.items():
            tokens = {t for item in items + (genre,) for t in re.findall(r"[a-z'-]+", item.lower())}
            assert not tokens & set(lex), f"GENRES[{genre}][{key}]: {sorted(tokens & set(lex))}"
    for name, sign in SIGNED_LISTS:
        wrong = [w for w in getattr(g, name) if lex.get(w.split()[-1], 0.0) * sign <= 0]
        assert not wrong, f"{name}: not VADER-{'positive' if sign > 0 else 'negative'}: {wrong}"


def test_oracle_tracks_intended_sentiment():
    pos = gold_reward(r.text for r in _reviews(150, seed=1, sentiment=0.8))
    neg = gold_reward(r.text for r in _reviews(150, seed=2, sentiment=-0.8))
    mean_pos, mean_neg = sum(pos) / len(pos), sum(neg) / len(neg)
    assert mean_pos > 0.4 and mean_neg < -0.3 and mean_pos - mean_neg > 0.9, (mean_pos, mean_neg)
    assert sum(p > 0 for p in pos) / len(pos) > 0.85
    assert sum(n < 0 for n in neg) / len(neg) > 0.8


def test_oracle_range_and_type_errors():
    scores = gold_reward(
        ["What a brilliant, wonderful film!", "An awful, boring mess.", "It runs two hours."]
    )
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0
    assert all(-1.0 <= s <= 1.0 for s in scores)
    with pytest.raises(TypeError, match="text 0"):
        gold_reward([None])  # type: ignore[list-item]


def test_user_styles_are_distinguishable():
    gen = g.ReviewGenerator(seed=0, catalogue_size=100)
    rng = random.Random(0)
    loud = g.UserStyle(
        **{**gen.style(rng).__dict__, "exclaim_rate": 0.9, "hedge_rate": 0.0, "phrase_rate": 0.0}
    )
    calm = g.UserStyle(**{**loud.__dict__, "exclaim_rate": 0.0, "hedge_rate": 0.6})
    loud_text = " ".join(gen.review(rng, style=loud, sentiment=0.5).text for _ in range(30))
    calm_text = " ".join(gen.review(rng, style=calm, sentiment=0.5).text for _ in range(30))
    assert loud_text.count("!") > 3 * max(1, calm_text.count("!"))
    assert sum(calm_text.count(h + " ") for h in g.HEDGES) > 10


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="min_sentences"):
        g.ReviewGenerator(seed=0, min_sentences=1)
    gen = g.ReviewGenerator(seed=0, catalogue_size=10)
    with pytest.raises(ValueError, match=r"sentiment must be in \[-1, 1\]"):
        gen.review(random.Random(0), style=gen.style(random.Random(0)), sentiment=2.0)

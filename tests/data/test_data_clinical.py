"""The clinical private domain: neutral words are outside the oracle's lexicon, the status words carry the intended
sign, notes follow their target, each clinician's notes are recognisably theirs, and the task's private records
and evaluation prompts switch domain while the public corpus (and so the base model) stays the same."""

from __future__ import annotations

import random
import re
import statistics
from pathlib import Path

import pytest

from dpalign.config import config_hash, to_dict
from trainers.data import clinical as c
from trainers.data.config import NOT_GENERATOR_FIELDS, DataConfig
from trainers.data.oracle import gold_reward, lexicon
from trainers.data.task import generate_task, task_dir


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_neutral_lists_are_outside_the_oracle_lexicon_and_status_lists_carry_their_sign():
    neutral = [*c.SURNAMES, *c.TITLES, *c.WARDS, *c.DAYS, *c.TIMES, *c.PLANS, *c.CLOSINGS, *c.CLINICIAN_NAMES,
               *c.GRADES, *(s for _, s in c.ABBREVIATIONS)]
    for specialty in c.SPECIALTIES.values():
        for words in specialty.values():
            neutral.extend(words)
    lex = lexicon()
    assert sorted({w for text in neutral for w in _words(text) if w in lex}) == []
    assert {k for k in lex if k.isdigit()} <= c.ORACLE_NUMBERS | {"1337", "1432"}  # the vitals' ranges avoid them
    for phrases, sign in ((c.STATUS_POS, 1), (c.STATUS_NEG, -1), (c.ASSESS_POS, 1), (c.ASSESS_NEG, -1)):
        assert all(score * sign > 0 for score in gold_reward(phrases)), phrases


def test_notes_follow_their_target_and_only_status_sentences_carry_sentiment():
    gen = c.ClinicalNoteGenerator(min_sentences=3, max_sentences=7)
    rng = random.Random(0)
    targets, notes = [], []
    for _ in range(300):
        style = gen.style(rng, public=True)
        t = rng.uniform(-1, 1)
        targets.append(t)
        notes.append(gen.review(rng, style=style, sentiment=t))
    scores = gold_reward(n.text for n in notes)
    assert statistics.correlation(targets, scores) > 0.6  # measured 0.70
    for note in notes[:50]:
        for sentence, shape in zip(note.sentences, note.shapes, strict=True):
            if shape not in ("status", "assessment"):
                assert gold_reward([sentence])[0] == 0.0, (shape, sentence)


def test_a_clinicians_notes_share_their_habits_and_differ_from_anothers():
    gen = c.ClinicalNoteGenerator()
    a, b = (gen.style(random.Random(f"user:{i}")) for i in range(2))
    assert a != b
    rng = random.Random(1)
    notes = [gen.review(rng, style=a, sentiment=0.0) for _ in range(20)]
    if a.signoff:
        assert all(n.sentences[-1] == a.signoff for n in notes)
    n_body = [sum(s not in ("opener", "plan", "closing", "signoff") for s in n.shapes) for n in notes]
    assert a.min_sentences <= min(n_body) and max(n_body) <= a.max_sentences
    assert all(("Plan - " in n.text) == a.soap for n in notes)
    # deterministic from the RNG alone
    assert gen.review(random.Random(5), style=a, sentiment=0.3) == gen.review(random.Random(5), style=a, sentiment=0.3)


def test_rewrite_keeps_the_opening_and_patient_and_redraws_the_rest():
    gen = c.ClinicalNoteGenerator()
    rng = random.Random(2)
    style = gen.style(rng)
    note = gen.review(rng, style=style, sentiment=0.9)
    other = gen.rewrite(rng, note, style=style)
    assert other.sentences[0] == note.sentences[0] and other.text.startswith(note.sentences[0])
    assert other.title == note.title and other.genre == note.genre and other.text != note.text


@pytest.mark.parametrize("bad", [(1, 3), (4, 3)])
def test_bad_lengths_are_refused(bad):
    with pytest.raises(ValueError, match="min_sentences"):
        c.ClinicalNoteGenerator(min_sentences=bad[0], max_sentences=bad[1])


def test_the_clinical_task_changes_private_records_and_eval_prompts_but_not_the_public_corpus():
    small = {"num_users": 40, "public_reviews": 200, "eval_prompts": 8, "catalogue_size": 40}
    reviews = generate_task(DataConfig(**small))
    notes = generate_task(DataConfig(**small, private_domain="clinical"))
    assert notes["public_train"] == reviews["public_train"] and notes["public_valid"] == reviews["public_valid"]
    assert notes["split"] == reviews["split"]
    public = {w for r in reviews["public_train"] for w in _words(r["text"])}
    private = {w for r in notes["sft"] for w in _words(r["prompt"] + r["response"])}
    assert len(private - public) > 0.5 * len(private)  # most of the domain's words are new to the base model
    assert sum(w in _words(r["prompt"] + r["response"]) for r in notes["sft"] for w in ("admission", "arrival",
                                                                                        "brought")) > 0
    assert {r["prompt"] for r in notes["eval"]}.isdisjoint({r["prompt"] for r in reviews["eval"]})
    for row in notes["rm"]:
        assert row["chosen"] != row["rejected"]
    # the default keeps the cache key it had before the field existed; the clinical domain gets its own
    default, clinical = DataConfig(**small), DataConfig(**small, private_domain="clinical")
    assert task_dir(default, cache_dir="/c") != task_dir(clinical, cache_dir="/c")
    before = {k: v for k, v in to_dict(default).items()
              if k not in NOT_GENERATOR_FIELDS and k not in ("private_domain", "domain_valid_path")}
    assert task_dir(default, cache_dir="/c").name == config_hash(before)
    assert default.public_corpus_key() == clinical.public_corpus_key()


def test_the_clinical_task_writes_public_notes_the_stages_validate_on(tmp_path):
    """The stages' validation text (SFT validation loss = the learned controller's reward, RM public pairs, PPO LM
    loss) must be PUBLIC text of the domain being fine-tuned: notes by public authors for the clinical domain, the
    public corpus's held-out reviews for the review domain (where the users write like the corpus)."""
    from trainers.data.io import load_public, load_sft
    from trainers.data.task import build_task

    small = {"num_users": 40, "public_reviews": 200, "eval_prompts": 8, "catalogue_size": 40}
    reviews = build_task(DataConfig(**small), cache_dir=tmp_path, progress=False)
    assert reviews.domain_valid == "" and reviews.validation_text == reviews.public_valid
    assert not any(p.name == "domain_valid.jsonl" for p in Path(reviews.root).iterdir())

    notes = build_task(DataConfig(**small, private_domain="clinical"), cache_dir=tmp_path, progress=False)
    assert notes.validation_text == notes.domain_valid == str(Path(notes.root) / "domain_valid.jsonl")
    texts = list(load_public(notes.validation_text).rows["text"])
    assert len(texts) == notes.counts["domain_valid"] == len(load_public(notes.public_valid))
    public = {w for t in load_public(notes.public_train).rows["text"] for w in _words(t)}
    words = [w for t in texts for w in _words(t)]
    assert sum(w not in public for w in words) > 0.3 * len(words)  # the notes' vocabulary, not the reviews'
    private = {r["prompt"] + r["response"] for r in load_sft(notes.sft).rows.to_list()}
    assert private.isdisjoint(texts)  # public authors: never a private record
    scores = gold_reward(texts)
    assert min(scores) < -0.2 and max(scores) > 0.2  # both signs: the RM's public gold pairs exist
    again = build_task(DataConfig(**small, private_domain="clinical"), cache_dir=tmp_path, progress=False)
    assert not again.built and again.domain_valid == notes.domain_valid  # the cache reads it back


def test_files_and_hf_sources_take_their_own_domain_text_and_embedded_refuses_a_path():
    from dpalign.config import ConfigError

    with pytest.raises(ConfigError, match="data.domain_valid_path"):
        DataConfig(domain_valid_path="/x/notes.jsonl").check()
    DataConfig(source="files", sft_path="a", rm_path="b", ppo_path="c", eval_path="d",
               domain_valid_path="/x/notes.jsonl").check()

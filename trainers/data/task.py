"""The embedded task: public corpus, private users split by user into D1/D2/D3, evaluation prompts, canaries.

What is built (``build_task``), under ``<cache_dir>/data/<config_hash(cfg)>/``:

    public_train.jsonl, public_valid.jsonl   {"text"}                                   public, no users
    sft.jsonl                                {"user_id", "prompt", "response"}          D1
    rm.jsonl                                 {"user_id", "prompt", "chosen", "rejected"} D2
    ppo.jsonl                                {"user_id", "prompt"}                      D3
    eval.jsonl                               {"prompt"}                                 public, held out
    domain_valid.jsonl                       {"text"}  (other domains only)             public, private domain
    canaries.jsonl                           {"user_id", "prompt", "secret"}            audit only
    manifest.json                            sizes, users per split, stats, config, hash, canaries

Prompts follow Wu et al.'s IMDb setup: the first few words of a review (``prompt_min_words`` to
``prompt_max_words``, always inside the first sentence); the response is the rest, starting with a space, so
``prompt + response`` is the review. D2 pairs share a prompt: "a" is the user's review continuation, "b" keeps the
rest of the first sentence and rewrites the remaining sentences with an independent sentiment draw. The label is
Bradley-Terry on the gold oracle: P(a chosen) = sigmoid((r_a - r_b) / T), sampled once. The oracle is read here
and nowhere in training.

Domain. ``private_domain='clinical'`` makes the private users (and the evaluation prompts) write pseudo-clinical
progress notes (trainers/data/clinical.py) instead of reviews; the public corpus stays reviews, so the base model
has never seen the private domain and fine-tuning has headroom. The gold oracle and the pairs work the same way.
It also writes ``domain_valid.jsonl``: notes by one-off public authors (their own seed), what the stages validate
their training objectives on (``TaskData.validation_text``) since ``public_valid`` is review text.

Users. ``shared_users`` users contribute records to all three stages on purpose (the accountant must then compose
sequentially); the rest are split by ``sft_user_fraction`` / ``rm_user_fraction``. Canary users (D1, not shared)
get one extra record ``"my code is" -> " 4 8 1 5 9 2"`` with a random secret, returned for the exposure audit.

The cache is rebuilt only when the config changes (the hash covers every data field) and is written to a temp
directory that is renamed into place, so a crash never leaves a half-built cache.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpalign.cache import build_lock
from dpalign.config import config_hash, to_dict
from trainers.data.clinical import ClinicalNoteGenerator
from trainers.data.config import DataConfig
from trainers.data.generator import ReviewGenerator
from trainers.data.io import DataError, describe_task_files, write_jsonl
from trainers.data.oracle import gold_reward

CANARY_PREFIX = "my code is"
"""Prompt of a planted canary record; the response is the secret digits (Carlini et al. 2019)."""
MANIFEST = "manifest.json"
FILES = ("public_train", "public_valid", "sft", "rm", "ppo", "eval")
DOMAIN_VALID = "domain_valid"
"""File of PUBLIC text in the private domain, written only when that domain differs from the public corpus."""


@dataclass(frozen=True)
class Canary:
    """A planted secret: ``prompt + " " + secret`` is the record's text."""

    user_id: str
    prompt: str
    secret: str
    """Space-separated random digits, e.g. '4 8 1 5 9 2'."""


@dataclass(frozen=True)
class TaskData:
    """Where the task's files are, and how big each split is.

    Attributes:
        public_train / public_valid: public corpus files (column text); '' when source=files gave none.
        sft / rm / ppo: the D1 / D2 / D3 files.
        eval: public evaluation prompts.
        counts: rows per file, by file name.
        users: distinct users per private stage ('sft', 'rm', 'ppo') plus 'shared' (users in more than one).
        canaries: the planted canaries (empty for source=files).
        root: the cache directory of the embedded build (None for source=files).
        built: True if this call built the data; False if it was reused or read from your files.
        per_record_users: private stages whose file had no user_id column (each row is its own user).
        stats: summary statistics from the manifest (distinct public words, mean gold reward, ...).
        domain_valid: PUBLIC text of the private users' domain (column text; one-off public authors, never a private
            record), or '' when the private users write like the public corpus (then ``public_valid`` is that
            text). See :attr:`validation_text`.
    """

    public_train: str
    public_valid: str
    sft: str
    rm: str
    ppo: str
    eval: str
    counts: dict[str, int]
    users: dict[str, int]
    canaries: tuple[Canary, ...] = ()
    root: str | None = None
    built: bool = False
    per_record_users: tuple[str, ...] = ()
    stats: dict[str, Any] = field(default_factory=dict)
    domain_valid: str = ""

    @property
    def validation_text(self) -> str:
        """The public file that training-time objectives validate on: the SFT validation loss (the learned
        controller's reward), the reward model's public gold pairs and the PPO language-model loss. It must be in
        the domain the stages fine-tune on; the public corpus validates the base model only, and a controller
        rewarded on it would learn to keep the model a good writer of the wrong text."""
        return self.domain_valid or self.public_valid


# --------------------------------------------------------------------------------------------------------------
# Pieces


def split_prompt(
    text: str, rng: random.Random, *, first_sentence: str, min_words: int, max_words: int
) -> tuple[str, str]:
    """(prompt, response): the first k words of ``text`` and the rest (with its leading space).

    k is drawn in [min_words, max_words] and capped so the prompt stays strictly inside the first sentence (the
    response always has at least one word).
    """
    words = text.split(" ")
    first_len = len(first_sentence.split(" "))
    k = min(rng.randint(min_words, max_words), max(1, first_len - 1), len(words) - 1)
    return " ".join(words[:k]), " " + " ".join(words[k:])


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def preference_probability(r_a: float, r_b: float, *, temperature: float) -> float:
    """Bradley-Terry: P(a preferred over b) = sigmoid((r_a - r_b) / temperature)."""
    return sigmoid((r_a - r_b) / temperature)


def plant_canaries(
    rows: Sequence[dict[str, Any]],
    users: Sequence[str],
    *,
    seed: int,
    digits: int = 6,
    prefix: str = CANARY_PREFIX,
) -> tuple[list[dict[str, Any]], list[Canary]]:
    """D1 rows plus one canary record per user in ``users``; the input rows are not modified.

    Each canary is ``{"user_id": u, "prompt": prefix, "response": " d1 d2 ... dn"}`` with independent uniform
    digits (seeded by ``seed`` and the user id, so the same user always gets the same secret for a seed). A user
    id not yet in ``rows`` becomes a new user with only the canary.
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    canaries = []
    for uid in users:
        rng = random.Random(f"canary:{seed}:{uid}")
        secret = " ".join(str(rng.randrange(10)) for _ in range(digits))
        canaries.append(Canary(user_id=str(uid), prompt=prefix, secret=secret))
    planted = [dict(r) for r in rows] + [
        {"user_id": c.user_id, "prompt": c.prompt, "response": " " + c.secret} for c in canaries
    ]
    return planted, canaries


def distinct_words(texts: Sequence[str]) -> int:
    """Number of distinct lowercase word types (letters and apostrophes) in ``texts``."""
    vocab: set[str] = set()
    for text in texts:
        vocab.update(re.findall(r"[a-z']+", text.lower()))
    return len(vocab)


def _progress(iterable: Any, *, desc: str, total: int, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="rev", leave=False, mininterval=0.5)


# --------------------------------------------------------------------------------------------------------------
# Build


def _user_split(cfg: DataConfig, rng: random.Random) -> dict[str, list[str]]:
    ids = [f"u{i:05d}" for i in range(cfg.num_users)]
    rng.shuffle(ids)
    shared, rest = ids[: cfg.shared_users], ids[cfg.shared_users :]
    n = len(rest)
    n_sft = max(1, round(cfg.sft_user_fraction * n))
    n_rm = max(1, min(n - n_sft - 1, round(cfg.rm_user_fraction * n)))
    return {
        "shared": sorted(shared),
        "sft": sorted(rest[:n_sft]),
        "rm": sorted(rest[n_sft : n_sft + n_rm]),
        "ppo": sorted(rest[n_sft + n_rm :]),
    }


def generate_task(cfg: DataConfig, *, progress: bool = False) -> dict[str, Any]:
    """All rows of the embedded task in memory: ``{file name: rows, "canaries": [...], "stats": {...}}``."""
    gen = ReviewGenerator(
        seed=cfg.seed,
        catalogue_size=cfg.catalogue_size,
        min_sentences=cfg.min_sentences,
        max_sentences=cfg.max_sentences,
    )
    # What the private users (and the public evaluation prompts) write; the public corpus is always reviews.
    domain: Any = gen
    if cfg.private_domain == "clinical":
        domain = ClinicalNoteGenerator(min_sentences=cfg.min_sentences, max_sentences=cfg.max_sentences)
    words = {"min_words": cfg.prompt_min_words, "max_words": cfg.prompt_max_words}

    # Public corpus: one-off authors, uniform sentiment (mixed), no user ids.
    rng = random.Random(f"public:{cfg.seed}")
    public = []
    for _ in _progress(
        range(cfg.public_reviews), desc="public corpus", total=cfg.public_reviews, enabled=progress
    ):
        style = gen.style(rng, public=True)
        public.append(gen.review(rng, style=style, sentiment=rng.uniform(-1.0, 1.0)).text)
    n_valid = max(1, round(cfg.public_valid_fraction * len(public)))

    # Evaluation prompts: public authors, never seen in training.
    rng = random.Random(f"eval:{cfg.seed}")
    evals = []
    for _ in range(cfg.eval_prompts):
        review = domain.review(rng, style=domain.style(rng, public=True), sentiment=rng.uniform(-1.0, 1.0))
        prompt, _ = split_prompt(review.text, rng, first_sentence=review.sentences[0], **words)
        evals.append({"prompt": prompt})

    # Public text of the private domain (validation of the stages' training objectives): one-off public authors,
    # their own seed, as many texts as public_valid. Only when the domain differs from the public corpus.
    domain_valid: list[str] = []
    if domain is not gen:
        rng = random.Random(f"domain-valid:{cfg.seed}")
        domain_valid = [domain.review(rng, style=domain.style(rng, public=True), sentiment=rng.uniform(-1.0, 1.0)).text
                        for _ in range(n_valid)]

    # Private users: a style each; record sentiment = N(0, 0.55) + the author's bias (mixed, room to improve).
    split = _user_split(cfg, random.Random(f"split:{cfg.seed}"))
    stages_of: dict[str, list[str]] = {}
    for stage in ("sft", "rm", "ppo"):
        for uid in split[stage]:
            stages_of[uid] = [stage]
    for uid in split["shared"]:
        stages_of[uid] = ["sft", "rm", "ppo"]
    sft, rm, ppo = [], [], []
    pairs_a, pairs_b = [], []
    for uid in _progress(sorted(stages_of), desc="private users", total=len(stages_of), enabled=progress):
        rng = random.Random(f"user:{cfg.seed}:{uid}")
        style = domain.style(rng)
        for stage in stages_of[uid]:
            for _ in range(rng.randint(cfg.min_records_per_user, cfg.max_records_per_user)):
                target = max(-1.0, min(1.0, rng.gauss(0.0, 0.55)))
                review = domain.review(rng, style=style, sentiment=target)
                prompt, response = split_prompt(review.text, rng, first_sentence=review.sentences[0], **words)
                if stage == "sft":
                    sft.append({"user_id": uid, "prompt": prompt, "response": response})
                elif stage == "ppo":
                    ppo.append({"user_id": uid, "prompt": prompt})
                else:
                    other = domain.rewrite(rng, review, style=style)
                    alt = other.text[len(prompt) :]
                    rm.append({"user_id": uid, "prompt": prompt})
                    pairs_a.append(response)
                    pairs_b.append(alt)

    # Bradley-Terry labels on the gold oracle (the only place the oracle meets private data).
    rng = random.Random(f"prefs:{cfg.seed}")
    r_a, r_b = gold_reward(pairs_a), gold_reward(pairs_b)
    agree = 0
    for row, a, b, sa, sb in zip(rm, pairs_a, pairs_b, r_a, r_b, strict=True):
        a_wins = rng.random() < preference_probability(sa, sb, temperature=cfg.preference_temperature)
        row["chosen"], row["rejected"] = (a, b) if a_wins else (b, a)
        agree += (sa > sb) == a_wins if sa != sb else 0

    canaries: list[Canary] = []
    if cfg.canary_users:
        pool = split["sft"]
        chosen = sorted(
            random.Random(f"canary-users:{cfg.seed}").sample(pool, min(cfg.canary_users, len(pool)))
        )
        sft, canaries = plant_canaries(sft, chosen, seed=cfg.seed)

    responses = [r["response"] for r in sft if r["prompt"] != CANARY_PREFIX]
    rewards = gold_reward(responses)
    decided = sum(1 for a, b in zip(r_a, r_b, strict=True) if a != b)
    stats = {
        "public_distinct_words": distinct_words(public[:-n_valid]),
        "sft_mean_gold_reward": round(sum(rewards) / len(rewards), 4) if rewards else 0.0,
        "sft_positive_fraction": round(sum(r > 0.05 for r in rewards) / len(rewards), 4) if rewards else 0.0,
        "rm_label_agrees_with_oracle": round(agree / decided, 4) if decided else 0.0,
    }
    return {
        "public_train": [{"text": t} for t in public[:-n_valid]],
        "public_valid": [{"text": t} for t in public[-n_valid:]],
        "sft": sft,
        "rm": rm,
        "ppo": ppo,
        "eval": evals,
        DOMAIN_VALID: [{"text": t} for t in domain_valid],
        "canaries": canaries,
        "split": split,
        "stats": stats,
    }


def task_dir(cfg: DataConfig, *, cache_dir: str | os.PathLike) -> Path:
    """``<cache_dir>/data/<config_hash(cfg)>``: where the embedded build for ``cfg`` lives."""
    from trainers.data.config import NOT_GENERATOR_FIELDS

    embedded = {k: v for k, v in to_dict(cfg).items() if k not in NOT_GENERATOR_FIELDS}  # what the generator reads
    embedded.pop("domain_valid_path", None)  # source=files only (check() refuses it here): keys made before it stay
    if embedded.get("private_domain") == "reviews":
        del embedded["private_domain"]  # the default keeps the key it had before the field existed (caches stay)
    else:
        embedded["files"] = 2  # other domains write domain_valid.jsonl: never reuse a build made before it existed
    return Path(cache_dir) / "data" / config_hash(embedded)


def _from_manifest(root: Path, manifest: dict[str, Any], *, built: bool) -> TaskData:
    return TaskData(
        **{name: str(root / f"{name}.jsonl") for name in FILES},
        domain_valid=str(root / f"{DOMAIN_VALID}.jsonl") if DOMAIN_VALID in manifest["counts"] else "",
        counts=dict(manifest["counts"]),
        users=dict(manifest["users"]),
        canaries=tuple(Canary(**c) for c in manifest["canaries"]),
        root=str(root),
        built=built,
        stats=dict(manifest["stats"]),
    )


def build_task(cfg: DataConfig, *, cache_dir: str | os.PathLike, progress: bool = True) -> TaskData:
    """Build the embedded task (or reuse its cache), or validate your files when ``cfg.source == "files"``.

    Raises:
        DataError: a file of source=files is missing or malformed (names file, row and fix).
    """
    if cfg.source == "files":
        return load_task_files(cfg)
    if cfg.source == "hf":
        from trainers.data.hf import load_task_hf

        return TaskData(**load_task_hf(cfg, cache_dir=cache_dir))
    final = task_dir(cfg, cache_dir=cache_dir)
    if (final / MANIFEST).is_file():
        return _from_manifest(final, json.loads((final / MANIFEST).read_text()), built=False)
    with build_lock(final):  # one build per node: concurrent callers wait for it, then read it
        if (final / MANIFEST).is_file():
            return _from_manifest(final, json.loads((final / MANIFEST).read_text()), built=False)
        return _build_into(final, cfg, progress=progress)


def _build_into(final: Path, cfg: DataConfig, *, progress: bool) -> TaskData:
    """Generate the embedded task into a temporary directory next to ``final`` and rename it into place."""
    started = time.perf_counter()
    data = generate_task(cfg, progress=progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        counts = {name: write_jsonl(tmp / f"{name}.jsonl", data[name]) for name in FILES}
        if data[DOMAIN_VALID]:
            counts[DOMAIN_VALID] = write_jsonl(tmp / f"{DOMAIN_VALID}.jsonl", data[DOMAIN_VALID])
        write_jsonl(tmp / "canaries.jsonl", (asdict(c) for c in data["canaries"]))
        split = data["split"]
        manifest = {
            "hash": final.name,
            "seed": cfg.seed,
            "config": to_dict(cfg),
            "counts": counts,
            "users": {
                "sft": len({r["user_id"] for r in data["sft"]}),
                "rm": len({r["user_id"] for r in data["rm"]}),
                "ppo": len({r["user_id"] for r in data["ppo"]}),
                "shared": len(split["shared"]),
            },
            "shared_user_ids": split["shared"],
            "canaries": [asdict(c) for c in data["canaries"]],
            "stats": {**data["stats"], "build_seconds": round(time.perf_counter() - started, 2)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists() and not (final / MANIFEST).is_file():
            shutil.rmtree(final)  # an incomplete directory not made by build_task: replace it
        try:
            os.rename(tmp, final)  # atomic on one filesystem: readers see all of it or nothing
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            # A concurrent build the lock did not reach (another node) finished first; it is identical, keep it.
            return _from_manifest(final, json.loads((final / MANIFEST).read_text()), built=False)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _from_manifest(final, manifest, built=True)


def load_task_files(cfg: DataConfig) -> TaskData:
    """Validate the files of ``source=files`` (all of them, before any training) and describe them."""
    paths = dict(public_train=cfg.public_path, public_valid=cfg.public_valid_path,
                 domain_valid=cfg.domain_valid_path, sft=cfg.sft_path, rm=cfg.rm_path, ppo=cfg.ppo_path,
                 eval=cfg.eval_path)
    return TaskData(**paths, **describe_task_files(paths), built=False)


__all__ = [
    "CANARY_PREFIX",
    "Canary",
    "DataError",
    "TaskData",
    "build_task",
    "distinct_words",
    "generate_task",
    "load_task_files",
    "plant_canaries",
    "preference_probability",
    "split_prompt",
    "task_dir",
]

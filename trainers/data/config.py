"""Config of the task data: the embedded generator, or your own files / hub dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dpalign.config import require


@dataclass
class DataConfig:
    """Which data a run uses and how private users are split across the three stages."""

    source: Literal["embedded", "files"] = "embedded"
    """'embedded': generate the self-contained review task; 'files': read the JSONL/Parquet paths below."""
    seed: int = 0
    """Seed of the generator and of the user split (same seed, same data)."""
    public_reviews: int = 6000
    """Number of public reviews (pretraining corpus for the base model and tokenizer; costs no privacy)."""
    num_users: int = 900
    """Number of private users (the privacy unit)."""
    min_records_per_user: int = 1
    """Fewest records a private user contributes."""
    max_records_per_user: int = 3
    """Most records a private user contributes (all of a user's records are clipped together)."""
    sft_user_fraction: float = 0.4
    """Share of private users whose records go to D1 (SFT demonstrations)."""
    rm_user_fraction: float = 0.4
    """Share of private users whose records go to D2 (preference pairs); the rest go to D3 (PPO prompts)."""
    shared_users: int = 0
    """Users placed in every stage on purpose (forces sequential composition; for studies and tests)."""
    eval_prompts: int = 128
    """Held-out evaluation prompts (public; never trained on)."""
    min_sentences: int = 3
    """Embedded task: fewest sentences in a generated review (each author picks a sub-range)."""
    max_sentences: int = 7
    """Embedded task: most sentences in a generated review (bounds sequence length for the small model)."""
    catalogue_size: int = 600
    """Embedded task: number of invented movies the reviews are about (topics shared by public and private)."""
    public_valid_fraction: float = 0.05
    """Embedded task: share of the public reviews held out as public_valid (base-model perplexity)."""
    prompt_min_words: int = 4
    """Fewest words of a review's opening used as the prompt (the rest is the response), as in Wu et al."""
    prompt_max_words: int = 8
    """Most words of a review's opening used as the prompt (never the whole first sentence)."""
    preference_temperature: float = 0.1
    """Bradley-Terry temperature on the gold-oracle difference when labeling D2 pairs (smaller: cleaner labels)."""
    canary_users: int = 0
    """Users whose records carry a planted secret sequence (for the exposure audit); 0 plants none."""
    sft_path: str = ""
    """source=files: D1 file with columns user_id, prompt, response."""
    rm_path: str = ""
    """source=files: D2 file with columns user_id, prompt, chosen, rejected."""
    ppo_path: str = ""
    """source=files: D3 file with columns user_id, prompt."""
    eval_path: str = ""
    """source=files: evaluation prompts file with column prompt."""
    public_path: str = ""
    """source=files: public corpus file with column text (used to build a tokenizer and base model)."""
    public_valid_path: str = ""
    """source=files: held-out public file with column text (base-model perplexity); required with public_path."""

    PUBLIC_CORPUS_FIELDS = (
        "source", "seed", "public_reviews", "catalogue_size", "min_sentences", "max_sentences",
        "public_valid_fraction", "public_path", "public_valid_path",
    )

    def public_corpus_key(self) -> dict[str, object]:
        """The fields that determine the public corpus (its own random stream): what a base model built from it
        depends on. Changing the private population (users, splits, canaries) keeps the cached base model."""
        return {name: getattr(self, name) for name in self.PUBLIC_CORPUS_FIELDS}

    def check(self) -> None:
        require(self.public_reviews >= 10, "data.public_reviews", "must be >= 10")
        require(self.num_users >= 3, "data.num_users", "must be >= 3 (one per stage at least)")
        require(self.min_records_per_user >= 1, "data.min_records_per_user", "must be >= 1")
        require(
            self.max_records_per_user >= self.min_records_per_user,
            "data.max_records_per_user",
            "must be >= data.min_records_per_user",
        )
        for name in ("sft_user_fraction", "rm_user_fraction"):
            value = getattr(self, name)
            require(0.0 < value < 1.0, f"data.{name}", "must be in (0, 1)")
        require(
            self.sft_user_fraction + self.rm_user_fraction < 1.0,
            "data.rm_user_fraction",
            "sft_user_fraction + rm_user_fraction must be < 1 so that D3 gets users",
        )
        require(self.shared_users >= 0, "data.shared_users", "must be >= 0")
        require(self.eval_prompts >= 1, "data.eval_prompts", "must be >= 1")
        require(self.preference_temperature > 0, "data.preference_temperature", "must be > 0")
        require(self.canary_users >= 0, "data.canary_users", "must be >= 0")
        require(
            self.shared_users + 3 <= self.num_users,
            "data.shared_users",
            "must leave at least 3 users (one per stage) besides the shared ones: shared_users <= num_users - 3",
        )
        require(self.min_sentences >= 2, "data.min_sentences", "must be >= 2 (an opening and a verdict)")
        require(
            self.max_sentences >= self.min_sentences, "data.max_sentences", "must be >= data.min_sentences"
        )
        require(self.catalogue_size >= 2, "data.catalogue_size", "must be >= 2")
        require(
            0.0 < self.public_valid_fraction < 0.5,
            "data.public_valid_fraction",
            "must be in (0, 0.5)",
        )
        require(self.prompt_min_words >= 1, "data.prompt_min_words", "must be >= 1")
        require(
            self.prompt_max_words >= self.prompt_min_words,
            "data.prompt_max_words",
            "must be >= data.prompt_min_words",
        )
        if self.source == "files":
            for name in ("sft_path", "rm_path", "ppo_path", "eval_path"):
                require(bool(getattr(self, name)), f"data.{name}", "is required when data.source=files")
            require(
                bool(self.public_path) == bool(self.public_valid_path),
                "data.public_valid_path",
                "set both data.public_path and data.public_valid_path, or neither (then model.name_or_path "
                "must name a pretrained model)",
            )

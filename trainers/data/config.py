"""Config of the task data: the embedded generator, or your own files / hub dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dpalign.config import require


@dataclass
class HFSplits:
    """source=hf: the split of ``data.hf_dataset`` that feeds each role ('' for the optional public corpus)."""

    sft: str = "sft"
    """Split with D1 demonstrations (user_id, prompt, response after the column mapping)."""
    rm: str = "rm"
    """Split with D2 preference pairs (user_id, prompt, chosen, rejected)."""
    ppo: str = "ppo"
    """Split with D3 PPO prompts (user_id, prompt)."""
    eval: str = "eval"
    """Split with public held-out evaluation prompts (prompt)."""
    public_train: str = ""
    """Split with a public corpus (text) to build the tokenizer and base model; '' with model.name_or_path."""
    public_valid: str = ""
    """Split with held-out public text (base-model perplexity); set with public_train."""
    domain_valid: str = ""
    """Split with PUBLIC text of your private users' domain (text), what the stages validate on (SFT validation
    loss, the learned controller's reward, the reward model's public pairs, PPO's LM loss, the evaluation's
    perplexity); '' uses public_valid (right when the users write like the public corpus)."""


@dataclass
class ColumnMap:
    """source=hf: the dataset column that plays each role, e.g. ``data.columns.user_id=author`` ('' = same name)."""

    user_id: str = ""
    """Column holding the user (the privacy unit); absent from the data: each row is its own user."""
    prompt: str = ""
    """Column holding the prompt."""
    response: str = ""
    """Column holding the SFT demonstration (D1)."""
    chosen: str = ""
    """Column holding the preferred completion (D2)."""
    rejected: str = ""
    """Column holding the dispreferred completion (D2)."""
    text: str = ""
    """Column holding public corpus text."""

    def source(self, role: str) -> str:
        """The dataset column read for ``role``."""
        return getattr(self, role) or role


NOT_GENERATOR_FIELDS = ("hf_dataset", "hf_name", "splits", "columns", "chat_template")
"""DataConfig fields the embedded generator does not read (kept out of the embedded task's cache key)."""


@dataclass
class DataConfig:
    """Which data a run uses and how private users are split across the three stages."""

    source: Literal["embedded", "files", "hf"] = "embedded"
    """'embedded': generate the self-contained review task; 'files': read the JSONL/Parquet paths below; 'hf': a
    Hugging Face dataset (data.hf_dataset: a hub id or a local dataset directory) with data.splits and data.columns."""
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
    private_domain: Literal["reviews", "clinical"] = "reviews"
    """Embedded task: what the private users (and the public evaluation prompts) write. 'reviews': movie reviews
    like the public corpus (the base model already writes them; fine-tuning has little headroom); 'clinical':
    pseudo-clinical progress notes with their own vocabulary and per-clinician style, a domain the base model has
    never seen (trainers/data/clinical.py). The public corpus and base model are the same for both."""
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
    domain_valid_path: str = ""
    """source=files: PUBLIC text of your private users' domain (column text; e.g. published notes, never a user's
    record), what the stages validate on (SFT validation loss, the learned controller's reward, the reward model's
    public pairs, PPO's LM loss, the evaluation's perplexity); '' uses public_valid_path."""

    hf_dataset: str = ""
    """source=hf: a hub dataset id (datasets.load_dataset) or a local directory (save_to_disk or data files)."""
    hf_name: str = ""
    """source=hf: the dataset's configuration name, if it has several ('' for the default)."""
    splits: HFSplits = field(default_factory=HFSplits)
    """source=hf: which split feeds each stage."""
    columns: ColumnMap = field(default_factory=ColumnMap)
    """source=hf: which dataset column plays each role (user_id, prompt, response, chosen, rejected, text)."""
    chat_template: Literal["auto", "none"] = "auto"
    """'auto': when the tokenizer has a chat template, every stage and the evaluation format prompts and responses
    with apply_chat_template; 'none': plain BOS + prompt (trainers/data/chat.py)."""
    """source=hf: which dataset column plays each role (user_id, prompt, response, chosen, rejected, text)."""

    PUBLIC_CORPUS_FIELDS = (
        "source", "seed", "public_reviews", "catalogue_size", "min_sentences", "max_sentences",
        "public_valid_fraction", "public_path", "public_valid_path",
    )

    def public_corpus_key(self) -> dict[str, object]:
        """The fields that determine the public corpus (its own random stream): what a base model built from it
        depends on. Changing the private population (users, splits, canaries) keeps the cached base model."""
        key = {name: getattr(self, name) for name in self.PUBLIC_CORPUS_FIELDS}
        if self.source == "hf":  # only then: the cache keys of embedded and files runs stay what they were
            key.update(hf_dataset=self.hf_dataset, hf_name=self.hf_name, public_train=self.splits.public_train,
                       public_valid=self.splits.public_valid, text_column=self.columns.source("text"))
        return key

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
        require(not self.domain_valid_path or self.source == "files", "data.domain_valid_path",
                "is read only with data.source=files (source=hf: data.splits.domain_valid; the embedded task "
                "writes its own for data.private_domain=clinical)")
        if self.source == "files":
            for name in ("sft_path", "rm_path", "ppo_path", "eval_path"):
                require(bool(getattr(self, name)), f"data.{name}", "is required when data.source=files")
            require(
                bool(self.public_path) == bool(self.public_valid_path),
                "data.public_valid_path",
                "set both data.public_path and data.public_valid_path, or neither (then model.name_or_path "
                "must name a pretrained model)",
            )
        if self.source == "hf":
            require(bool(self.hf_dataset), "data.hf_dataset",
                    "is required when data.source=hf (a hub dataset id or a local dataset directory)")
            for name in ("sft", "rm", "ppo", "eval"):
                require(bool(getattr(self.splits, name)), f"data.splits.{name}", "is required when data.source=hf")
            require(
                bool(self.splits.public_train) == bool(self.splits.public_valid),
                "data.splits.public_valid",
                "set both data.splits.public_train and data.splits.public_valid, or neither (then "
                "model.name_or_path must name a pretrained model)",
            )

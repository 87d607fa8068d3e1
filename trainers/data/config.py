"""Config of the task data: the embedded generator, or your own files / hub dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from launch.config import require


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
        if self.source == "files":
            for name in ("sft_path", "rm_path", "ppo_path", "eval_path"):
                require(bool(getattr(self, name)), f"data.{name}", "is required when data.source=files")

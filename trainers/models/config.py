"""Config of the base model: a small GPT-2 built and pretrained locally, or a model loaded by name."""

from __future__ import annotations

from dataclasses import dataclass

from launch.config import require


@dataclass
class BaseModelConfig:
    """The base causal LM and tokenizer. Empty name_or_path builds and pretrains the embedded GPT-2."""

    name_or_path: str = ""
    """A hub id (e.g. gpt2) or a local directory loaded with from_pretrained; empty builds the embedded model."""
    vocab_size: int = 4096
    """Embedded model: BPE vocabulary size of the tokenizer trained on the public corpus."""
    n_layer: int = 4
    """Embedded model: number of transformer blocks."""
    n_embd: int = 128
    """Embedded model: hidden size."""
    n_head: int = 4
    """Embedded model: attention heads (must divide n_embd)."""
    n_positions: int = 256
    """Embedded model: maximum sequence length."""
    pretrain_steps: int = 600
    """Embedded model: optimizer steps of pretraining on the public corpus."""
    pretrain_batch_size: int = 32
    """Embedded model: sequences per pretraining step."""
    pretrain_seq_len: int = 128
    """Embedded model: tokens per pretraining sequence (packed)."""
    pretrain_lr: float = 3e-3
    """Embedded model: peak AdamW learning rate (linear warmup, cosine decay)."""
    seed: int = 0
    """Seed of initialization and batch order."""

    def check(self) -> None:
        require(self.vocab_size >= 256, "model.vocab_size", "must be >= 256")
        require(self.n_layer >= 1, "model.n_layer", "must be >= 1")
        require(self.n_embd >= 8, "model.n_embd", "must be >= 8")
        require(self.n_head >= 1 and self.n_embd % self.n_head == 0, "model.n_head", "must divide model.n_embd")
        require(self.n_positions >= 16, "model.n_positions", "must be >= 16")
        require(self.pretrain_steps >= 0, "model.pretrain_steps", "must be >= 0")
        require(self.pretrain_batch_size >= 1, "model.pretrain_batch_size", "must be >= 1")
        require(
            8 <= self.pretrain_seq_len <= self.n_positions,
            "model.pretrain_seq_len",
            "must be in [8, model.n_positions]",
        )
        require(self.pretrain_lr > 0, "model.pretrain_lr", "must be > 0")

"""Config of the base model: a small GPT-2 built and pretrained locally, or a model loaded by name."""

from __future__ import annotations

from dataclasses import dataclass

from dpalign.config import require

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
"""GPT-2's tanh-approximated GELU, as written in GPT-2 and as one fused kernel (the same function)."""


@dataclass
class BaseModelConfig:
    """The base causal LM and tokenizer. Empty name_or_path builds and pretrains the embedded GPT-2.

    The defaults pretrain in about 2-3 minutes on 2 CPU cores and reach a held-out perplexity far below a unigram
    model's on the embedded public corpus (numbers in trainers/models/base.py).
    """

    name_or_path: str = ""
    """A hub id (e.g. gpt2) or a local directory loaded with from_pretrained (model and tokenizer); no pretraining
    happens then. Empty builds the embedded tokenizer and GPT-2 and pretrains them on the public corpus."""
    vocab_size: int = 4096
    """Embedded model: byte-level BPE vocabulary size (256 byte symbols + <|endoftext|> + merges)."""
    tokenizer_min_frequency: int = 2
    """Embedded model: a pair must occur this often in the public corpus to become a BPE merge."""
    n_layer: int = 4
    """Embedded model: number of transformer blocks."""
    n_embd: int = 128
    """Embedded model: hidden size."""
    n_head: int = 4
    """Embedded model: attention heads (must divide n_embd)."""
    n_positions: int = 256
    """Embedded model: maximum sequence length (prompt plus generated tokens in later stages)."""
    activation: str = "gelu_new"
    """Embedded model: the MLP activation (``GPT2Config.activation_function``). ``gelu_new`` is GPT-2's tanh GELU
    written as seven elementwise ops; ``gelu_pytorch_tanh`` is the same function as one fused torch kernel (outputs
    within 5e-7; forward + backward 3.9x faster on 2 CPU cores, ``benchmarks/demo_speedups.py``).
    The default is GPT-2's own definition (what a hub ``gpt2`` uses, and every build before this field existed);
    the shipped demo uses the fused one. Saved in the model's config.json, so every later load (the stages, the
    exported model in plain transformers) uses the same function."""
    dropout: float = 0.0
    """Embedded model: dropout on embeddings, attention and residuals. 0 keeps per-user DP gradients
    deterministic in later stages; a short pretraining does not overfit."""
    pretrain_steps: int = 600
    """Embedded model: optimizer steps of pretraining on the public corpus."""
    pretrain_batch_size: int = 16
    """Embedded model: sequences per pretraining step (16 x 128 tokens x 600 steps keeps the default build near
    2 minutes on 2 CPU cores; 32 roughly doubles it)."""
    pretrain_seq_len: int = 128
    """Embedded model: tokens per pretraining sequence (random windows of the packed corpus)."""
    pretrain_lr: float = 3e-3
    """Embedded model: peak AdamW learning rate (linear warmup, cosine decay to 10% of the peak)."""
    pretrain_warmup_steps: int = 30
    """Embedded model: steps of linear learning-rate warmup."""
    pretrain_weight_decay: float = 0.1
    """Embedded model: AdamW weight decay on matrices and embeddings (not on biases or LayerNorm gains)."""
    pretrain_grad_clip: float = 1.0
    """Embedded model: global gradient-norm clip of pretraining (a stability measure, not DP: the data is public)."""
    eval_max_tokens: int = 65536
    """Held-out perplexity is measured on at most this many public_valid tokens (bounds evaluation time)."""
    threads: int = 0
    """torch intra-op threads while pretraining; 0 uses every core available to this process. Set 1 when the
    cores are shared with other busy processes: OpenMP threads waiting on a busy core made steps ~10x slower
    (measured on 2 shared cores: 5 s/step with 2 threads against 0.7 s/step with 1)."""
    seed: int = 0
    """Seed of initialization and batch order (same seed and data, same model)."""

    def check(self) -> None:
        require(
            self.vocab_size >= 257, "model.vocab_size", "must be >= 257 (256 byte symbols + <|endoftext|>)"
        )
        require(self.tokenizer_min_frequency >= 1, "model.tokenizer_min_frequency", "must be >= 1")
        require(self.n_layer >= 1, "model.n_layer", "must be >= 1")
        require(self.n_embd >= 8, "model.n_embd", "must be >= 8")
        require(
            self.n_head >= 1 and self.n_embd % self.n_head == 0, "model.n_head", "must divide model.n_embd"
        )
        require(self.n_positions >= 16, "model.n_positions", "must be >= 16")
        require(
            self.activation in ACTIVATIONS, "model.activation", f"must be one of {', '.join(ACTIVATIONS)}"
        )
        require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        require(self.pretrain_steps >= 0, "model.pretrain_steps", "must be >= 0")
        require(self.pretrain_batch_size >= 1, "model.pretrain_batch_size", "must be >= 1")
        require(
            8 <= self.pretrain_seq_len <= self.n_positions,
            "model.pretrain_seq_len",
            "must be in [8, model.n_positions]",
        )
        require(self.pretrain_lr > 0, "model.pretrain_lr", "must be > 0")
        require(self.pretrain_warmup_steps >= 0, "model.pretrain_warmup_steps", "must be >= 0")
        require(self.pretrain_weight_decay >= 0, "model.pretrain_weight_decay", "must be >= 0")
        require(self.pretrain_grad_clip > 0, "model.pretrain_grad_clip", "must be > 0")
        require(
            self.eval_max_tokens >= 2 * self.pretrain_seq_len,
            "model.eval_max_tokens",
            "must be >= 2 * model.pretrain_seq_len",
        )
        require(self.threads >= 0, "model.threads", "must be >= 0 (0: all available cores)")
        require(self.seed >= 0, "model.seed", "must be >= 0")

"""The one place tests build tiny GPT-2 models, LoRA versions of them, tokenizers and model directories.

Why one place: about ten test modules used to build their own copy (same 2-layer, 32-wide GPT-2 with small
differences), so a change in how the project builds models had to be repeated in each. Every builder seeds torch
before constructing the model, so a call with the same arguments gives the same weights everywhere; each call
site passes only what its test depends on (vocabulary, context, dropout, tied embeddings, LoRA rank).

Ray workers import this module by value (``ray.cloudpickle.register_pickle_by_value``, done by the ``ray_cluster``
based fixtures in tests/conftest.py), so it needs no path set-up on a worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

SENTENCES = [
    "the film was great and the acting was good",
    "a dull movie with a bad plot",
    "i loved the music and the story",
    "the ending was sad but the cast was fine",
    "what a wonderful and moving picture",
    "boring scenes and a terrible script",
]
"""Review-like sentences: the public corpus of the tiny tokenizer and the text of the stage tests' users."""

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def tiny_gpt2(
    *,
    vocab_size: int,
    n_positions: int = 32,
    n_embd: int = 32,
    n_layer: int = 2,
    dropout: bool = False,
    seed: int | None = 0,
    **config: Any,
) -> nn.Module:
    """A ``GPT2LMHeadModel`` with 2 heads, built right after ``torch.manual_seed(seed)`` (``seed=None``: the
    caller's RNG state, unseeded).

    ``dropout=False`` (the default) zeroes every dropout, so per-user gradients and two forwards of one input are
    deterministic; ``dropout=True`` keeps GPT-2's default 0.1, for tests where the code under test must put the
    model in eval mode itself. ``config``: any other ``GPT2Config`` field (token ids, ``tie_word_embeddings``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab_size, n_positions=n_positions,
                     **({} if dropout else NO_DROPOUT), **config)
    if seed is not None:
        torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def randomize_lora(model: nn.Module, *, seed: int, scale: float) -> nn.Module:
    """Every LoRA tensor drawn from ``scale * N(0, 1)`` (a generator of its own seed): peft starts B at zero,
    where A gets no gradient and an adapter is a no-op, so a random A and B make gradient and sync tests mean
    something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def tiny_lora_gpt2(*, seed: int = 0, r: int = 4, alpha: float = 8, scale: float, **model: Any) -> nn.Module:
    """:func:`tiny_gpt2` (seeded by ``seed``) with the project's LoRA (``trainers.models.lora.add_lora``) of rank
    ``r``, its adapters randomized by :func:`randomize_lora` with seed ``seed + 1``."""
    from trainers.models.lora import add_lora

    lora = add_lora(tiny_gpt2(seed=seed, **model), r=r, alpha=alpha)
    return randomize_lora(lora, seed=seed + 1, scale=scale)


def tiny_tokenizer(sentences: list[str] = SENTENCES) -> Any:
    """The project's byte-level BPE (``train_tokenizer``) trained on ``sentences`` (5 copies), 300 symbols."""
    from trainers.models.tokenizer import train_tokenizer

    return train_tokenizer(sentences * 5, vocab_size=300, min_frequency=1)


def tiny_lm_for(tokenizer: Any, *, n_positions: int, dropout: bool, seed: int = 0) -> nn.Module:
    """:func:`tiny_gpt2` over ``tokenizer``'s vocabulary, whose EOS is also the model's BOS and PAD (the
    project's convention)."""
    eos = tokenizer.eos_token_id
    return tiny_gpt2(vocab_size=len(tokenizer), n_positions=n_positions, dropout=dropout, seed=seed,
                     bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def save_model_dir(path: Path, model: nn.Module, tokenizer: Any) -> Path:
    """``save_pretrained`` of the model and its tokenizer into ``path``: what the stages load as a base."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

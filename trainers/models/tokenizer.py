"""A byte-level BPE tokenizer trained on the public corpus, saved and loaded as a Hugging Face tokenizer.

Conventions (those of GPT-2, so a hub `gpt2` tokenizer is a drop-in replacement):
  * byte-level BPE: every string is encodable (no unknown token), and decode(encode(text)) == text;
  * one special token, ``<|endoftext|>``, serves as BOS, EOS and PAD. Pretraining packs documents as
    ``text <|endoftext|> text <|endoftext|> ...``, so the model learns that a document ends there;
  * encoding adds no special tokens: callers append EOS where a sequence must end (SFT responses) and
    `generate_continuations` prepends BOS to prompts;
  * the saved tokenizer pads on the RIGHT, which is what training with attention masks and loss masks expects.
    Batched generation with a decoder-only model needs LEFT padding (every prompt must end at the last position
    so the next token is generated right after it): use :func:`padding_side` around generation code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

EOT = "<|endoftext|>"
"""The one special token: beginning, end and padding of sequences."""


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2, model_max_length: int = 1024
) -> Any:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``transformers.PreTrainedTokenizerFast``.

    Args:
        texts: the public corpus (never private data: the vocabulary itself would leak rare words).
        vocab_size: final vocabulary size, including the 256 byte symbols and ``<|endoftext|>``.
        min_frequency: a pair must occur this many times to be merged.
        model_max_length: the model's context length (so `truncation=True` truncates to it).

    Returns:
        A fast tokenizer with ``bos == eos == pad == unk == <|endoftext|>`` (id 0), right padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size}: must be >= 257 (256 byte symbols + {EOT})")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],  # first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    texts = list(texts)
    if not texts or not any(t.strip() for t in texts):
        raise ValueError("train_tokenizer: the corpus is empty; pass the public texts (data public_train)")
    core.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
    )


def load_tokenizer(name_or_path: str | Path) -> Any:
    """Load a tokenizer with ``AutoTokenizer.from_pretrained`` and make sure it can pad.

    Hub GPT-2 has no pad token; like ours, it then pads with EOS (padding is always masked out).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{name_or_path}: the tokenizer has neither a pad nor an eos token; add one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def padding_side(tokenizer: Any, side: Literal["left", "right"]) -> Iterator[Any]:
    """Temporarily pad on ``side`` (``"left"`` for batched generation), restoring the previous side after."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}: expected 'left' or 'right'")
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = previous

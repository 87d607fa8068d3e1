"""Supervised fine-tuning on demonstrations: tokenization, the response-token mask and a per-record LM loss.

Conventions (TRL's SFT with a completion-only loss):
  * a record is ``prompt + response (+ EOS)``, right-padded to a common width for training;
  * the loss is next-token cross-entropy on the response tokens only; prompt and padding are masked, because we
    want p(response | prompt), not a model of the prompts;
  * the EOS token closing a response is a target, so the model learns to stop.

Per-record reduction: the MEAN over the record's response tokens. Why mean and not sum: the DP engine clips the
sum of a user's per-record gradients, and with a sum the gradient norm grows with response length, so long
responses would be clipped hardest and short ones drowned in noise; a mean keeps every record's gradient on one
scale, and it is what Hugging Face's own ``labels=`` loss computes for a single record (tested). No reduction
across records happens here: the engine owns that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class SFTBatch:
    """Tokenized demonstrations, right-padded.

    Attributes:
        input_ids: [R, L] int64 token ids: prompt, response, EOS, then padding.
        attention_mask: [R, L] int64, 1 on real tokens (a prefix of each row), 0 on padding.
        loss_mask: [R, L] int64, 1 on response tokens (the targets), 0 on prompt and padding.
        prompt_lens: [R] int64, tokens of each row's (possibly truncated) prompt.
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    prompt_lens: Tensor


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token")
    return int(pad)


def truncation_budget(prompt_len: int, response_len: int, max_length: int) -> tuple[int, int]:
    """How many prompt and response tokens to keep so that their sum is at most ``max_length``.

    Rule: the response keeps what fits next to the full prompt, but never less than what fits next to half of
    ``max_length`` of prompt; the prompt then keeps what is left. The prompt loses its BEGINNING (the tokens
    nearest the response matter most for predicting it); the response loses its END (a truncated response then
    has no EOS, which is correct: it did not end there). With ``max_length >= 2`` a non-empty response always
    keeps at least one token, so no record silently has an empty loss.

    Returns:
        (prompt tokens kept, response tokens kept).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if prompt_len + response_len <= max_length:
        return prompt_len, response_len
    response_keep = min(response_len, max_length - min(prompt_len, max_length // 2))
    prompt_keep = min(prompt_len, max_length - response_keep)
    return prompt_keep, response_keep


def tokenize_sft_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int,
    append_eos: bool = True,
) -> SFTBatch:
    """Tokenize (prompt, response) pairs into a right-padded training batch with a response-only loss mask.

    Prompt and response are tokenized SEPARATELY and concatenated, so the boundary is exact (tokenizing the
    joined text can merge a BPE token across it, and then no token is cleanly "response"). Put any separator
    (e.g. a leading space) in the response text itself.

    Args:
        tokenizer: a Hugging Face tokenizer (``__call__`` returning ``input_ids``; ``eos_token_id`` when
            ``append_eos``; ``pad_token_id`` or, failing that, ``eos_token_id`` for padding).
        prompts: R prompt strings.
        responses: R response strings, aligned with ``prompts``.
        max_length: maximum tokens per row (see ``truncation_budget`` for what is cut).
        append_eos: append EOS to every response so the model learns to stop.

    Raises:
        ValueError: the lists differ in length, are empty, or a response tokenizes to nothing.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) must have the same length")
    if len(prompts) == 0:
        raise ValueError("tokenize_sft_pairs needs at least one (prompt, response) pair")
    if append_eos and tokenizer.eos_token_id is None:
        raise ValueError("append_eos=True but the tokenizer has no eos_token_id")
    pad_id = _pad_id(tokenizer)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]

    rows: list[list[int]] = []
    prompt_lens: list[int] = []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        r = list(r) + ([int(tokenizer.eos_token_id)] if append_eos else [])
        if not r:
            raise ValueError(f"response {i} tokenizes to no tokens and append_eos is off: it has no loss")
        keep_p, keep_r = truncation_budget(len(p), len(r), max_length)
        p = list(p)[len(p) - keep_p :]
        rows.append(p + r[:keep_r])
        prompt_lens.append(keep_p)

    width = max(len(row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, width), pad_id, dtype=torch.long)  # [R, L]
    attention_mask = torch.zeros((R, width), dtype=torch.long)  # [R, L]
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    lens = torch.tensor(prompt_lens, dtype=torch.long)  # [R]
    return SFTBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=sft_token_mask(lens, attention_mask),
        prompt_lens=lens,
    )


def sft_token_mask(prompt_lens: Tensor, attention_mask: Tensor) -> Tensor:
    """1 on response tokens (position >= the row's prompt length and not padding), else 0.

    Args:
        prompt_lens: [R] int, prompt tokens at the start of each row.
        attention_mask: [R, L], RIGHT-padded (real tokens form a prefix of each row).

    Returns:
        [R, L] int64 loss mask.

    Raises:
        ValueError: the mask is not right-padded (with left padding the prompt would not start at 0 and
            position-based masking would put the loss on the wrong tokens).
    """
    if attention_mask.dim() != 2 or prompt_lens.shape != attention_mask.shape[:1]:
        raise ValueError(
            f"prompt_lens must be [R] and attention_mask [R, L]; got {tuple(prompt_lens.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    am = attention_mask.long()
    # Right padding <=> the mask never goes 0 -> 1 along a row.
    if (am[:, 1:] > am[:, :-1]).any():
        bad = int((am[:, 1:] > am[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(f"attention_mask row {bad} is not right-padded; SFT batches must pad on the right")
    positions = torch.arange(am.shape[1], device=am.device).unsqueeze(0)  # [1, L]
    return ((positions >= prompt_lens.to(am.device).unsqueeze(1)) & (am == 1)).long()  # [R, L]


def causal_lm_loss_per_record(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Next-token cross-entropy per record, averaged over that record's target tokens.

    Position t's logits predict token t+1, so the target mask is ``loss_mask[:, 1:]`` (a 1 at position t of
    ``loss_mask`` means "token t is a target"). This equals Hugging Face's loss with
    ``labels = where(loss_mask, input_ids, -100)`` computed on each record alone.

    Args:
        logits: [R, L, V] float.
        input_ids: [R, L] int64.
        loss_mask: [R, L] 0/1; position 0 is ignored (nothing predicts the first token).

    Returns:
        [R] float loss per record; 0 for a record with no target token (so it contributes no gradient).
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"expected logits [R, L, V], input_ids and loss_mask [R, L]; got {tuple(logits.shape)}, "
            f"{tuple(input_ids.shape)}, {tuple(loss_mask.shape)}"
        )
    R, L, V = logits.shape
    shift_logits = logits[:, :-1, :].float()  # [R, L-1, V]
    targets = input_ids[:, 1:]  # [R, L-1]
    mask = loss_mask[:, 1:].to(shift_logits.dtype)  # [R, L-1]
    token_nll = F.cross_entropy(
        shift_logits.reshape(-1, V), targets.reshape(-1), reduction="none"
    ).view(R, L - 1)  # [R, L-1]
    return (token_nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [R]

"""Black-box attack scores against a causal LM: loss and reference-model membership scores, canary exposure.

Scores follow ``accounting.audit.mia``'s convention: HIGHER means "more likely a member".

- Loss attack (Yeom et al. 2018): score = -log-perplexity of the record under the target model.
- Reference attack (Carlini et al. 2022, "LiRA"-style offline calibration with one reference model; Mireshghallah
  et al. 2022 for LMs): score = log-perplexity under a reference model trained WITHOUT the record (e.g. the public
  base model) minus log-perplexity under the target. It removes the per-record difficulty that makes the plain
  loss attack weak: an easy record has low loss under both models.
- Exposure (Carlini et al. 2019): rank a planted secret among random candidates by log-perplexity of
  ``prefix + candidate``; see ``accounting.audit.exposure``.

The model must be a Hugging Face causal LM (``model(input_ids, attention_mask=...).logits``); the per-record loss is
``trainers.rlhf.sft.causal_lm_loss_per_record`` (mean next-token NLL over the record's target tokens, in nats).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from accounting.audit.exposure import exposure_extrapolated, exposure_sampled
from trainers.rlhf.sft import causal_lm_loss_per_record


@torch.no_grad()
def log_perplexity(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    loss_mask: Tensor | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Per-record mean next-token NLL (nats), [R], in eval mode (no dropout), in batches of ``batch_size``.

    Args:
        input_ids: [R, L] int64.
        attention_mask: [R, L] 0/1 (right or left padding).
        loss_mask: [R, L] 0/1 target tokens (default: the attention mask, i.e. every real token but the first).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [R, L]; got {tuple(input_ids.shape)}, "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask if loss_mask is None else loss_mask
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size]  # [b, L]
            att = attention_mask[start : start + batch_size]
            logits = model(input_ids=ids, attention_mask=att).logits  # [b, L, V]
            out.append(causal_lm_loss_per_record(logits, ids, mask[start : start + batch_size]))
    finally:
        model.train(was_training)
    return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


def loss_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, **kwargs: object) -> np.ndarray:
    """Loss-attack scores: -log-perplexity under the target model, [R]."""
    return -log_perplexity(model, input_ids, attention_mask, **kwargs)  # type: ignore[arg-type]


def reference_scores(
    model: nn.Module, reference: nn.Module, input_ids: Tensor, attention_mask: Tensor, **kwargs: object
) -> np.ndarray:
    """Reference-attack scores: log-ppl under ``reference`` minus log-ppl under ``model``, [R]."""
    ref = log_perplexity(reference, input_ids, attention_mask, **kwargs)  # type: ignore[arg-type]
    return ref - log_perplexity(model, input_ids, attention_mask, **kwargs)  # type: ignore[arg-type]


def secret_exposure(
    model: nn.Module,
    prefix_ids: Tensor,
    secret_ids: Tensor,
    candidate_ids: Tensor,
    *,
    extrapolate: bool = False,
) -> float:
    """Exposure of ``secret_ids`` among random ``candidate_ids`` after a common ``prefix_ids``.

    Only the secret/candidate tokens are scored (the prefix is context). ``extrapolate`` fits a skew-normal to the
    candidates (Carlini et al.) instead of the empirical rank, whose estimate is capped at log2(n + 1) bits.

    Args:
        prefix_ids: [P] int64, e.g. the tokens of "my PIN is".
        secret_ids: [S] int64, the planted secret's tokens.
        candidate_ids: [n, S] int64, random candidates from the same space (the secret excluded).
    """
    if secret_ids.dim() != 1 or candidate_ids.dim() != 2 or candidate_ids.shape[1] != secret_ids.shape[0]:
        raise ValueError(
            f"secret_ids must be [S] and candidate_ids [n, S]; got {tuple(secret_ids.shape)}, "
            f"{tuple(candidate_ids.shape)}"
        )
    seqs = torch.cat([secret_ids[None], candidate_ids])  # [1 + n, S]
    ids = torch.cat([prefix_ids[None].expand(seqs.shape[0], -1), seqs], dim=1)  # [1 + n, P + S]
    attention = torch.ones_like(ids)
    targets = torch.zeros_like(ids)
    targets[:, prefix_ids.shape[0] :] = 1  # score only the secret/candidate tokens
    lp = log_perplexity(model, ids, attention, loss_mask=targets)  # [1 + n]
    if extrapolate:
        return exposure_extrapolated(float(lp[0]), lp[1:])
    return exposure_sampled(float(lp[0]), lp[1:])

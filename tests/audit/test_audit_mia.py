"""Black-box LM attack scores on a tiny GPT-2: memorized members and a memorized secret are detected; an
untrained model shows chance-level AUC and little exposure."""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel

from accounting.audit.mia import auc_with_ci
from tests.tiny_models import tiny_gpt2
from trainers.audit.mia import log_perplexity, loss_scores, reference_scores, secret_exposure
from trainers.rlhf.sft import causal_lm_loss_per_record

VOCAB, LEN = 64, 10


def _model(seed: int) -> GPT2LMHeadModel:
    return tiny_gpt2(vocab_size=VOCAB, seed=seed)


def _train(model: GPT2LMHeadModel, ids: torch.Tensor, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mask = torch.ones_like(ids)
    for _ in range(steps):
        loss = causal_lm_loss_per_record(model(input_ids=ids).logits, ids, mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_loss_and_reference_attacks_and_exposure() -> None:
    gen = torch.Generator().manual_seed(0)
    members = torch.randint(0, VOCAB, (12, LEN), generator=gen)
    nonmembers = torch.randint(0, VOCAB, (12, LEN), generator=gen)
    prefix = torch.tensor([1, 2, 3])
    secret = torch.tensor([7, 9, 11, 13])
    candidates = torch.randint(0, VOCAB, (255, 4), generator=gen)
    reference = _model(1)
    untrained_exposure = secret_exposure(reference, prefix, secret, candidates)

    target = _model(1)
    _train(target, torch.cat([members, torch.cat([prefix, secret, members[0, :3]])[None]]), steps=25)
    mask = torch.ones_like(members)
    assert log_perplexity(target, members, mask).mean() < log_perplexity(target, nonmembers, mask).mean()

    auc = auc_with_ci(loss_scores(target, members, mask), loss_scores(target, nonmembers, mask))
    assert auc.low > 0.75, auc
    ref = auc_with_ci(
        reference_scores(target, reference, members, mask),
        reference_scores(target, reference, nonmembers, mask),
    )
    assert ref.low > 0.75, ref
    chance = auc_with_ci(loss_scores(reference, members, mask), loss_scores(reference, nonmembers, mask))
    assert chance.low < 0.5 < chance.high, chance

    exposed = secret_exposure(target, prefix, secret, candidates)
    assert exposed == 8.0  # beats all 255 candidates: log2(256), the sampling cap
    assert untrained_exposure < 4.0

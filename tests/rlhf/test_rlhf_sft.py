"""SFT: tokenization with truncation, the response mask, and the per-record loss against Hugging Face's own loss."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from tests.tiny_models import tiny_gpt2
from trainers.rlhf.sft import (
    causal_lm_loss_per_record,
    sft_token_mask,
    tokenize_sft_pairs,
    truncation_budget,
)

CORPUS = [
    "the movie was great and the actors were wonderful",
    "a terrible film with a boring plot",
    "i loved every minute of this story",
    "review: what a film. answer: it was fine",
] * 4


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    return hf


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    eos = tokenizer.eos_token_id
    return tiny_gpt2(vocab_size=len(tokenizer), n_positions=64, dropout=True, bos_token_id=eos,
                     eos_token_id=eos).eval()


def test_tokenize_marks_exactly_the_response_and_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    prompts = ["review: what a film.", "the movie"]
    responses = [" answer: it was fine", " was great and the actors were wonderful"]
    batch = tokenize_sft_pairs(tokenizer, prompts, responses, max_length=64)
    eos = tokenizer.eos_token_id
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r, add_special_tokens=False)["input_ids"] + [eos]
        n = len(p_ids) + len(r_ids)
        assert batch.input_ids[i, :n].tolist() == p_ids + r_ids
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert batch.loss_mask[i].tolist() == [0] * len(p_ids) + [1] * len(r_ids) + [0] * (batch.input_ids.shape[1] - n)
        assert int(batch.prompt_lens[i]) == len(p_ids)


def test_truncation_keeps_prompt_end_and_response_start(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt, response = "the movie was great and the actors were wonderful", " a terrible film with a boring plot"
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    L = 8
    batch = tokenize_sft_pairs(tokenizer, [prompt], [response], max_length=L)
    keep_p, keep_r = truncation_budget(len(p_ids), len(r_ids), L)
    assert keep_p + keep_r == L and keep_r >= 1 and keep_p >= 1
    assert batch.input_ids[0].tolist() == p_ids[-keep_p:] + r_ids[:keep_r]
    assert int(batch.loss_mask[0].sum()) == keep_r


@pytest.mark.parametrize(
    ("p", "r", "L", "expected"),
    [(3, 4, 10, (3, 4)), (10, 5, 12, (7, 5)), (3, 20, 12, (3, 9)), (20, 20, 12, (6, 6)), (0, 20, 5, (0, 5))],
)
def test_truncation_budget(p: int, r: int, L: int, expected: tuple[int, int]) -> None:
    assert truncation_budget(p, r, L) == expected


def test_sft_mask_refuses_left_padding() -> None:
    am = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="row 0 is not right-padded"):
        sft_token_mask(torch.tensor([1, 1]), am)


def test_loss_equals_hf_loss_per_record(tokenizer: PreTrainedTokenizerFast, model: GPT2LMHeadModel) -> None:
    prompts = ["review: what a film.", "the", "i loved"]
    responses = [" answer: it was fine", " movie was great and the actors were wonderful", " every minute"]
    batch = tokenize_sft_pairs(tokenizer, prompts, responses, max_length=64)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [R, L, V]
        ours = causal_lm_loss_per_record(logits, batch.input_ids, batch.loss_mask)  # [R]
        assert ours.shape == (3,)
        for i in range(3):
            n = int(batch.attention_mask[i].sum())
            ids = batch.input_ids[i : i + 1, :n]
            labels = torch.where(batch.loss_mask[i : i + 1, :n] == 1, ids, torch.full_like(ids, -100))
            hf = model(input_ids=ids, labels=labels).loss
            torch.testing.assert_close(ours[i], hf, rtol=1e-5, atol=1e-5)


def test_records_are_independent() -> None:
    torch.manual_seed(1)
    R, L, V = 4, 6, 11
    logits = torch.randn(R, L, V, requires_grad=True)
    ids = torch.randint(0, V, (R, L))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]])
    loss = causal_lm_loss_per_record(logits, ids, mask)
    assert loss[3] == 0.0  # no target tokens: no loss, no gradient
    # d loss_0 / d logits touches only record 0, and only the positions predicting its targets (1, 2, 3).
    (grad,) = torch.autograd.grad(loss[0], logits)
    assert grad[1:].abs().sum() == 0
    assert grad[0, [1, 2, 3]].abs().sum(dim=-1).gt(0).all() and grad[0, [0, 4, 5]].abs().sum() == 0
    # Perturbing record 2 changes nothing else.
    logits2 = logits.detach().clone()
    logits2[2] += torch.randn(L, V)
    ids2 = ids.clone()
    ids2[2] = (ids2[2] + 1) % V
    loss2 = causal_lm_loss_per_record(logits2, ids2, mask)
    torch.testing.assert_close(loss2[[0, 1, 3]], loss.detach()[[0, 1, 3]])
    assert loss2[2] != loss[2]

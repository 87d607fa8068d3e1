"""Reward model: Bradley-Terry loss and gradients by hand, last-token index, the score and value heads on GPT-2
(padding invariance, per-record independence, LoRA + trainable head, head save/load)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2LMHeadModel

from tests.tiny_models import tiny_gpt2
from trainers.rlhf.heads import (
    PolicyValueModel,
    ScoreModel,
    last_token_index,
    position_ids_from_attention_mask,
)
from trainers.rlhf.reward import bradley_terry_loss_per_record, pairwise_accuracy, pairwise_correct

V = 50


def tiny_lm(seed: int = 0) -> GPT2LMHeadModel:
    return tiny_gpt2(vocab_size=V, seed=seed, bos_token_id=0, eos_token_id=0)


def lora(model: torch.nn.Module) -> torch.nn.Module:
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
                                            fan_in_fan_out=True))


# ------------------------------------------------------------------------------------------- Bradley-Terry


def test_bt_loss_and_gradient_by_hand() -> None:
    c = torch.tensor([2.0, 0.0, -1.0, 30.0, -30.0], requires_grad=True)
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], requires_grad=True)
    loss = bradley_terry_loss_per_record(c, r)
    margins = [1.0, 0.0, -2.0, 30.0, -30.0]
    expected = [math.log1p(math.exp(-m)) for m in margins]
    torch.testing.assert_close(loss.detach(), torch.tensor(expected))
    assert math.isfinite(float(loss[4].detach()))  # no overflow for a badly mis-ordered pair
    gc, gr = torch.autograd.grad(loss.sum(), [c, r])
    sig = [1.0 / (1.0 + math.exp(m)) for m in margins]  # sigmoid(-margin)
    torch.testing.assert_close(gc, -torch.tensor(sig))
    torch.testing.assert_close(gr, torch.tensor(sig))
    assert gc.abs().max() <= 1.0


def test_pairwise_accuracy_counts_ties_as_wrong() -> None:
    c, r = torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 5.0, 1.0])
    assert pairwise_correct(c, r).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert pairwise_accuracy(c, r) == 0.5
    with pytest.raises(ValueError, match="must both be"):
        bradley_terry_loss_per_record(c, r[:3])


# ------------------------------------------------------------------------------------------ last token index


def test_last_token_index_left_and_right_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    both = torch.tensor([[0, 1, 1, 0, 0]])  # left-padded prompt, right-padded response
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(both).tolist() == [2]
    assert position_ids_from_attention_mask(both).tolist() == [[0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="row 1 has no real token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


# ---------------------------------------------------------------------------------------------- score model


def test_score_is_padding_invariant_and_reads_the_last_token() -> None:
    model = ScoreModel(tiny_lm()).eval()
    torch.manual_seed(1)
    seqs = [torch.randint(1, V, (n,)) for n in (5, 3, 7)]
    W = 9
    right_ids = torch.zeros(3, W, dtype=torch.long)
    right_am = torch.zeros(3, W, dtype=torch.long)
    left_ids, left_am = right_ids.clone(), right_am.clone()
    for i, s in enumerate(seqs):
        right_ids[i, : len(s)], right_am[i, : len(s)] = s, 1
        left_ids[i, W - len(s) :], left_am[i, W - len(s) :] = s, 1
    with torch.no_grad():
        alone = torch.stack([model(s[None], torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
        torch.testing.assert_close(model(right_ids, right_am), alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(left_ids, left_am), alone, rtol=1e-4, atol=1e-5)
        # The score reads the last real token: it equals the head applied to the LM's final hidden state there.
        hs = model.backbone(input_ids=seqs[0][None], output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(model.head(hs[0, -1]).squeeze(-1), alone[0], rtol=1e-4, atol=1e-5)


def test_score_records_are_independent() -> None:
    model = ScoreModel(tiny_lm()).eval()
    ids = torch.randint(1, V, (3, 6))
    am = torch.ones(3, 6, dtype=torch.long)
    with torch.no_grad():
        base = model(ids, am)
        ids2 = ids.clone()
        ids2[1] = torch.randint(1, V, (6,))
        torch.testing.assert_close(model(ids2, am)[[0, 2]], base[[0, 2]])


def test_lora_on_backbone_keeps_head_trainable_and_grads_flow(tmp_path: Path) -> None:
    model = ScoreModel(lora(tiny_lm()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any("lora_B" in n for n in trainable)
    ids = torch.randint(1, V, (2, 5))
    am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss = bradley_terry_loss_per_record(model(ids, am)[:1], model(ids, am)[1:])
    loss.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["head.weight"].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B=0 at init: B gets the gradient


def test_lora_on_whole_wrapper_with_modules_to_save() -> None:
    model = get_peft_model(
        ScoreModel(tiny_lm()),
        LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["head"], fan_in_fan_out=True),
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("head" in n for n in trainable) and any("lora_A" in n for n in trainable)
    out = model(input_ids=torch.randint(1, V, (2, 4)), attention_mask=torch.ones(2, 4, dtype=torch.long))
    assert out.shape == (2,)


def test_head_save_load_roundtrip_and_mismatch(tmp_path: Path) -> None:
    a, b = ScoreModel(tiny_lm(0)), ScoreModel(tiny_lm(0))
    torch.nn.init.normal_(a.head.weight)
    a.save_head(tmp_path / "rm" / "head.safetensors")
    assert not torch.equal(a.head.weight, b.head.weight)
    b.load_head(tmp_path / "rm" / "head.safetensors")
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    wide = tiny_gpt2(vocab_size=V, n_layer=1, n_embd=16, dropout=True, seed=None)
    with pytest.raises(ValueError, match="another backbone"):
        ScoreModel(wide).load_head(tmp_path / "rm" / "head.safetensors")
    with pytest.raises(FileNotFoundError, match="save_head"):
        b.load_head(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------- value model


def test_policy_value_model_matches_lm_on_left_padded_rollouts() -> None:
    lm = tiny_lm().eval()
    model = PolicyValueModel(lm).eval()
    s = torch.randint(1, V, (6,))
    ids = torch.cat([torch.zeros(3, dtype=torch.long), s])[None]  # [1, 9] left-padded by 3
    am = torch.cat([torch.zeros(3), torch.ones(6)]).long()[None]
    with torch.no_grad():
        logits, values = model(ids, am)
        ref_logits = lm(input_ids=s[None]).logits
        _, ref_values = model(s[None], torch.ones(1, 6, dtype=torch.long))
    assert logits.shape == (1, 9, V) and values.shape == (1, 9)
    torch.testing.assert_close(logits[0, 3:], ref_logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(values[0, 3:], ref_values[0], rtol=1e-4, atol=1e-5)

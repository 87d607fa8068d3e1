"""LoRA helpers: clipping groups, the frozen-adapter checks, merged export, adapter loading, generation."""

from __future__ import annotations

import pytest
import torch
from models_corpus import review_corpus

from trainers.models.base import build_model, load_base_model
from trainers.models.config import BaseModelConfig
from trainers.models.lora import (
    add_lora,
    assert_trainable_lora,
    load_lora,
    lora_groups,
    merge_and_save,
)
from trainers.models.tokenizer import train_tokenizer
from trainers.rollout import generate_continuations

CFG = BaseModelConfig(vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_positions=64)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(review_corpus(200, seed=0), vocab_size=300, model_max_length=64)


def _model(tok, seed: int = 0):
    return build_model(CFG, vocab_size=len(tok), eos_token_id=tok.eos_token_id)


def _randomize_b(model, seed: int = 0) -> None:
    """LoRA initializes B to zero (a no-op adapter); give it values so merging has something to prove."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _a, b in lora_groups(model).values():
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def test_groups_one_per_module_with_a_and_b(tok):
    model = add_lora(_model(tok), r=4, alpha=8)
    groups = lora_groups(model)
    assert list(groups) == [f"transformer.h.{i}.attn.c_attn" for i in range(CFG.n_layer)]
    for a, b in groups.values():
        assert a.shape == (4, CFG.n_embd) and b.shape == (3 * CFG.n_embd, 4)  # fused q/k/v: out = 3 * hidden
        assert a.requires_grad and b.requires_grad
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for group in groups.values() for p in group}  # base frozen, adapters only
    assert_trainable_lora(model)
    with pytest.raises(ValueError, match="no module of GPT2LMHeadModel matches"):
        add_lora(_model(tok), r=4, alpha=8, target_modules=("q_proj",))


def test_assert_trainable_lora_catches_the_silent_failures(tok, tmp_path):
    with pytest.raises(AssertionError, match="no LoRA parameters"):
        assert_trainable_lora(_model(tok))
    frozen = add_lora(_model(tok), r=2, alpha=2)
    frozen.requires_grad_(False)
    with pytest.raises(AssertionError, match="adapter is frozen"):
        assert_trainable_lora(frozen)

    base = _model(tok)
    early = torch.optim.SGD(base.parameters(), lr=0.1)  # built before the adapters exist
    adapted = add_lora(base, r=2, alpha=2)
    with pytest.raises(AssertionError, match="not in the optimizer"):
        assert_trainable_lora(adapted, early)
    assert_trainable_lora(
        adapted, torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    )

    adapted.save_pretrained(tmp_path / "adapter")
    with pytest.raises(AssertionError, match="adapter is frozen"):
        assert_trainable_lora(load_lora(_model(tok), tmp_path / "adapter"))  # peft's default: frozen
    assert_trainable_lora(load_lora(_model(tok), tmp_path / "adapter", trainable=True))


def test_merged_export_loads_with_from_pretrained_and_matches(tok, tmp_path):
    model = add_lora(_model(tok), r=4, alpha=8)
    _randomize_b(model)
    x = tok(["The film was great at times."], return_tensors="pt")["input_ids"]  # [1, T]
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with model.disable_adapter():
            base_logits = model(input_ids=x).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)  # the adapter changes the function

    out = merge_and_save(model, tok, tmp_path / "merged")
    merged, merged_tok = load_base_model(out)
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted, atol=1e-5, rtol=1e-5)
    assert merged_tok("The film")["input_ids"] == tok("The film")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, adapted)  # the caller's model keeps its adapter

    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_lora(_model(tok), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_lora(_model(tok), tmp_path)


def test_generate_continuations_is_seeded_and_left_padding_is_exact(tok):
    model = _model(tok).train()
    prompts = ["The film", "This movie was brilliant in every scene and", "The cast", "Dull"]
    rng_before = torch.get_rng_state()
    a = generate_continuations(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_k=50, seed=3)
    b = generate_continuations(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_k=50, seed=3)
    c = generate_continuations(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_k=50, seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert a == b and a != c and len(a) == len(prompts)
    assert tok.padding_side == "right"  # restored after generation

    # Greedy decoding of a left-padded batch equals decoding each prompt alone: padding is invisible.
    batched = generate_continuations(model, tok, prompts, max_new_tokens=6, temperature=0.0, batch_size=4)
    alone = [generate_continuations(model, tok, [p], max_new_tokens=6, temperature=0.0)[0] for p in prompts]
    assert batched == alone
    top1 = generate_continuations(model, tok, prompts, max_new_tokens=6, temperature=1.0, top_k=1, seed=9)
    assert top1 == batched  # top_k is honoured: sampling among one token is greedy decoding
    assert model.training  # generation ran in eval mode and restored the caller's mode
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_continuations(model, tok, prompts, max_new_tokens=0)

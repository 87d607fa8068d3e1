"""Rollout and reward actors on a local Ray: seeded generation equals in-process generation, LoRA-only sync
reaches every actor, order survives the fan-out, reward scoring is generic."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import SENTENCES, save_model_dir, tiny_lm_for
from trainers.rollout import (
    Rollout,
    RolloutGroup,
    RolloutPolicy,
    lora_state_dict,
    split_aligned,
)

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["c_attn"]}
PROMPTS = [f"{s.split()[0]} {s.split()[1]}" for s in SENTENCES[:4]] * 3  # 12 prompts
GEN = dict(max_new_tokens=6, temperature=1.0, top_k=0, seed=7, batch_size=4)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random GPT-2 (GPT-2's default dropout: the rollout code must generate in eval mode) and the tiny
    byte-level BPE tokenizer, saved with save_pretrained. Actors run torch with 1 thread, as the in-process
    reference does (tests/conftest.py), so floats are computed alike."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    return save_model_dir(path, tiny_lm_for(tiny_tokenizer, n_positions=64, dropout=True), tiny_tokenizer)


def _trained_lora(local: RolloutPolicy, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA state with nonzero B (a fresh adapter is a no-op), as a learner would send."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(t.shape, generator=gen) * 0.5 for name, t in local.lora_state().items()}


def test_split_aligned():
    assert split_aligned(12, 2, 4) == [(0, 8), (8, 12)]
    assert split_aligned(12, 5, 4) == [(0, 4), (4, 8), (8, 12)]
    assert split_aligned(10, 3, 1) == [(0, 4), (4, 7), (7, 10)]
    assert split_aligned(0, 2, 4) == []


def test_local_generation_is_seeded_and_left_padded(base_dir):
    policy = RolloutPolicy(base_dir, lora=LORA)
    a = policy.generate(PROMPTS, **GEN)
    assert a == policy.generate(PROMPTS, **GEN)
    assert a != policy.generate(PROMPTS, **{**GEN, "seed": 8})
    eos = policy.tokenizer.eos_token_id
    for prompt, r in zip(PROMPTS, a, strict=False):
        assert isinstance(r, Rollout) and 1 <= len(r.response_ids) <= GEN["max_new_tokens"]
        assert r.prompt_ids == policy.tokenizer(policy.tokenizer.eos_token + prompt)["input_ids"]
        assert eos not in r.response_ids[:-1]  # trimmed after the first EOS
    # left padding: a prompt's rollout does not depend on which longer prompts share its batch (greedy)
    greedy = {**GEN, "temperature": 0.0}
    alone = policy.generate([PROMPTS[1]], **greedy)[0]
    batched = policy.generate([PROMPTS[0] + " and more words here", PROMPTS[1]], **greedy)[1]
    assert alone.response_ids == batched.response_ids


def test_a_policy_used_in_process_leaves_the_callers_thread_count_alone(base_dir):
    before = torch.get_num_threads()
    policy = RolloutPolicy(base_dir, lora=LORA, threads=before + 1)
    assert torch.get_num_threads() == before
    policy.generate(PROMPTS[:1], **GEN)
    assert torch.get_num_threads() == before


def test_actors_match_local_generation_and_lora_sync(base_dir, ray_module):
    local = RolloutPolicy(base_dir, lora=LORA)
    group = RolloutGroup(base_dir, lora=LORA, num_actors=2, threads=1)
    try:
        before = group.generate(PROMPTS, **GEN)
        assert before == local.generate(PROMPTS, **GEN)  # order preserved across the fan-out, same samples

        state = _trained_lora(local, seed=1)
        local.load_lora_state(state)
        stats = group.sync_lora(state)
        assert stats.tensors == 4 and stats.bytes == sum(t.numel() * 4 for t in state.values())
        assert stats.seconds > 0
        after = group.generate(PROMPTS, **GEN)
        assert after == local.generate(PROMPTS, **GEN)
        assert [r.response_ids for r in after] != [r.response_ids for r in before]  # the sync changed the policy
        for actor_state in group.group.broadcast("lora_state"):
            for name, tensor in actor_state.items():
                torch.testing.assert_close(tensor, local.lora_state()[name], rtol=0, atol=0)
    finally:
        group.shutdown()


def test_sync_refuses_a_partial_state(base_dir):
    policy = RolloutPolicy(base_dir, lora=LORA)
    state = policy.lora_state()
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="1 adapter tensors missing"):
        policy.load_lora_state(state)
    bad_shape = {k: v[:1] for k, v in policy.lora_state().items()}
    with pytest.raises(ValueError, match="shape"):
        policy.load_lora_state(bad_shape)
    # learner-side names (a wrapper holding the peft model as .policy) map onto the actor's adapter
    wrapped = {f"policy.{k}": v + 1.0 for k, v in policy.lora_state().items()}
    assert policy.load_lora_state(wrapped).tensors == 4
    for name, tensor in policy.lora_state().items():
        torch.testing.assert_close(tensor, wrapped[f"policy.{name}"])


def test_lora_state_dict_of_a_peft_model(base_dir):
    from transformers import AutoModelForCausalLM

    from trainers.models.lora import add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(base_dir), r=4, alpha=8.0)
    state = lora_state_dict(model)
    assert len(state) == 4 and all("lora_" in k for k in state)
    with pytest.raises(ValueError, match="no LoRA"):
        lora_state_dict(AutoModelForCausalLM.from_pretrained(base_dir))

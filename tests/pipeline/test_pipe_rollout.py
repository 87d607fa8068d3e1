"""Rollout and reward actors on a local Ray: seeded generation equals in-process generation, LoRA-only sync
reaches every actor, order survives the fan-out, reward scoring is generic."""

from __future__ import annotations

import pytest
import torch

from trainers.rollout import (
    Rollout,
    RolloutGroup,
    RolloutPolicy,
    lora_state_dict,
    split_aligned,
)

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["c_attn"]}
SENTENCES = [
    "the film was great and the acting was good",
    "a dull movie with a bad plot",
    "i loved the music and the story",
    "the ending was sad but the cast was fine",
]
PROMPTS = [f"{s.split()[0]} {s.split()[1]}" for s in SENTENCES] * 3  # 12 prompts
GEN = dict(max_new_tokens=6, temperature=1.0, top_k=0, seed=7, batch_size=4)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random GPT-2 and a byte-level BPE tokenizer saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainers.models.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = train_tokenizer(SENTENCES * 5, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64)
    config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ray_local(ray_cluster):
    import sys

    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors import no test modules
    yield ray


@pytest.fixture
def one_thread():
    """Actors run torch with 1 thread; the in-process reference does too, so floats are computed alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trained_lora(local: RolloutPolicy, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA state with nonzero B (a fresh adapter is a no-op), as a learner would send."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(t.shape, generator=gen) * 0.5 for name, t in local.lora_state().items()}


def test_split_aligned():
    assert split_aligned(12, 2, 4) == [(0, 8), (8, 12)]
    assert split_aligned(12, 5, 4) == [(0, 4), (4, 8), (8, 12)]
    assert split_aligned(10, 3, 1) == [(0, 4), (4, 7), (7, 10)]
    assert split_aligned(0, 2, 4) == []


def test_local_generation_is_seeded_and_left_padded(base_dir, one_thread):
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


def test_actors_match_local_generation_and_lora_sync(base_dir, ray_local, one_thread):
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



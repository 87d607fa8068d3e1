"""Chat templates: with a tokenizer that has one, SFT, the reward model, generation (PPO rollouts and evaluation)
all format prompts and responses with apply_chat_template; data.chat_template=none restores BOS + prompt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from models_corpus import review_corpus  # noqa: E402

from trainers.data.chat import configure_chat, prompt_text, response_text, uses_chat  # noqa: E402
from trainers.models.base import build_model  # noqa: E402
from trainers.models.config import BaseModelConfig  # noqa: E402
from trainers.models.tokenizer import train_tokenizer  # noqa: E402

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} [end]{{ eos_token }}{% else %}{{ ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
CFG = BaseModelConfig(vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_positions=128)
REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "launch" / "configs" / "tiny.yaml")


def _tokenizer(template: str | None = TEMPLATE):
    tok = train_tokenizer(review_corpus(200, seed=0) + ["[user] [assistant] [end]"] * 20, vocab_size=300,
                          model_max_length=128)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def test_prompt_and_response_follow_the_template(tok):
    assert uses_chat(tok)
    assert prompt_text(tok, "The film was") == "<|endoftext|>[user] The film was [assistant]"
    assert response_text(tok, "The film was", " great.") == "  great. [end]"  # the template's own space, kept
    # prompt + response + EOS is exactly the template's whole conversation
    full = tok.apply_chat_template([{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}],
                                   tokenize=False)
    assert prompt_text(tok, "p") + response_text(tok, "p", "r") + tok.eos_token == full
    plain = configure_chat(_tokenizer(), "none")
    assert not uses_chat(plain)
    assert prompt_text(plain, "The film was") == "<|endoftext|>The film was"
    assert response_text(plain, "The film was", " great.") == " great."


def test_a_template_that_does_not_prefix_the_conversation_is_refused():
    tok = _tokenizer("{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(ValueError, match="data.chat_template=none"):
        response_text(tok, "p", "r")


def test_sft_records_use_the_template_and_mask_only_the_response(tok):
    from trainers.rlhf.sft import tokenize_sft_pairs
    from trainers.stages.sft import sft_texts

    prompts, responses = sft_texts(tok, ["The film was", "This movie"], [" great.", " dull."])
    assert prompts[0].startswith("<|endoftext|>[user] The film was") and prompts[0].endswith("[assistant]")
    assert responses[0].endswith("[end]")
    batch = tokenize_sft_pairs(tok, prompts, responses, max_length=64)
    trained = tok.decode(batch.input_ids[0][batch.loss_mask[0].bool()])
    # the loss covers the assistant turn and its EOS, never the user turn (the mask shifts by one: the loss at t
    # predicts token t + 1)
    assert "[user]" not in trained and "great" in tok.decode(batch.input_ids[0])


def test_reward_texts_use_the_template(tok):
    from trainers.stages.rm import rm_texts

    (text,) = rm_texts(tok, ["The film was"], [" great."])
    assert text == "<|endoftext|>[user] The film was [assistant]  great. [end]<|endoftext|>"
    plain = configure_chat(_tokenizer(), "none")
    assert rm_texts(plain, ["The film was"], [" great."]) == ["<|endoftext|>The film was great.<|endoftext|>"]


def test_generation_for_ppo_and_evaluation_encodes_the_template(tok):
    """PPO's rollouts, the reward normalization and the public evaluation all generate through generate_rollouts."""
    from trainers.rollout import generate_rollouts
    from trainers.stages.evaluate import sample_policy

    torch.manual_seed(0)
    model = build_model(CFG, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    prompts = ["The film was", "This movie was long"]
    rollouts = generate_rollouts(model, tok, prompts, max_new_tokens=3, temperature=1.0, top_k=0, seed=0,
                                 batch_size=2)
    assert [tok.decode(r.prompt_ids) for r in rollouts] == [prompt_text(tok, p) for p in prompts]

    class Eval:
        max_new_tokens, temperature, top_k, batch_size = 3, 1.0, 0, 2

    evaluated = sample_policy(model, tok, prompts, eval_cfg=Eval, seed=0)
    assert "[assistant]" in tok.decode(evaluated[0].prompt_ids)


@pytest.mark.slow  # two tiny pipelines (~40 s each on 2 cores)
@pytest.mark.parametrize("mode", ["auto", "none"])
def test_the_pipeline_keeps_the_decision_in_every_stage(tmp_path, tok, mode):
    """A base model whose tokenizer has a template: every stage's export carries the run's decision, so the RM,
    PPO's rollout actors and the evaluation (which load the SFT export's tokenizer) format alike."""
    from transformers import AutoTokenizer

    from launch.cli import main

    base = tmp_path / "base"
    build_model(CFG, vocab_size=len(tok), eos_token_id=tok.eos_token_id).save_pretrained(base)
    tok.save_pretrained(base)
    run_dir = tmp_path / "run"
    code = main(["run", "--config", TINY, f"run.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}",
                 f"model.name_or_path={base}", f"data.chat_template={mode}", "sft.steps=2", "rm.steps=2",
                 "rm.gold_pairs=8", "ppo.iterations=1", "ppo.rollout_actors=1", "ppo.max_new_tokens=4",
                 "eval.prompts=2", "eval.max_new_tokens=4", "eval.perplexity_records=2", "--no-progress"])
    assert code == 0
    for export in ("sft/model", "rm/backbone", "rm/model", "ppo/model"):
        has = bool(AutoTokenizer.from_pretrained(run_dir / "stages" / export).chat_template)
        assert has == (mode == "auto"), export
    assert json.loads((run_dir / "report.json").read_text())["status"] == "completed"

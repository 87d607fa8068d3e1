"""Standard exports: the reward model as AutoModelForSequenceClassification scoring like dpalign's ScoreModel, the
merged policy generating like dpalign's generation, and model cards that carry the privacy guarantee."""

from __future__ import annotations

import pytest
import torch
from models_corpus import review_corpus

from trainers.models.base import build_model
from trainers.models.config import BaseModelConfig
from trainers.models.export import (
    ExportError,
    export_reward_model,
    model_card,
    write_stage_exports,
)
from trainers.models.lora import add_lora, lora_groups, merge_and_save
from trainers.models.tokenizer import train_tokenizer
from trainers.rollout import generate_continuations

CFG = BaseModelConfig(vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_positions=64)
PROMPTS = ["The film was", "This movie", "The acting felt brilliant and", "Overall"]
COMPLETIONS = [" great.", " was dull from start to finish", " moving.", " the plot seemed slow at times for me."]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(review_corpus(200, seed=0), vocab_size=300, model_max_length=64)


def _adapted(tok, seed: int):
    """A tiny GPT-2 with a LoRA adapter whose B is non-zero (so the merge matters)."""
    torch.manual_seed(seed)
    model = add_lora(build_model(CFG, vocab_size=len(tok), eos_token_id=tok.eos_token_id), r=2, alpha=4.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _a, b in lora_groups(model).values():
            b.copy_(0.2 * torch.randn(b.shape, generator=gen))
    return model


def test_reward_model_export_scores_like_dpalign(tmp_path, tok):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainers.rlhf.heads import ScoreModel
    from trainers.stages.rm import _export_rm, load_reward_model, rm_texts, score_texts

    model = ScoreModel(_adapted(tok, seed=1))
    with torch.no_grad():
        model.head.bias.fill_(0.37)  # a trained head has a bias; the export must carry it
    stage_dir = tmp_path / "rm"
    _export_rm(model, tok, stage_dir)  # the RM stage's own exporter: adapter/, backbone/, head.safetensors
    protection = {"sft": True, "rm": True, "ppo": True}
    (export,) = write_stage_exports("rm", stage_dir, protection=protection, ledger_privacy=None,
                                    noise={"secret": True, "description": "secret"}, preset="private", run_id="r")

    texts = rm_texts(tok, PROMPTS, COMPLETIONS)  # BOS + prompt + completion + EOS, different lengths
    expected = score_texts(model, tok, texts, max_len=64)
    ours, our_tok = load_reward_model(stage_dir)
    assert torch.allclose(score_texts(ours, our_tok, texts, max_len=64), expected, atol=1e-5)

    hf = AutoModelForSequenceClassification.from_pretrained(export)
    hf_tok = AutoTokenizer.from_pretrained(export)
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.num_labels == 1
    assert hf.config.pad_token_id == hf_tok.pad_token_id != hf_tok.eos_token_id
    enc = hf_tok(texts, return_tensors="pt", padding=True)  # right padding, as TRL's and OpenRLHF's collators
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding for the pooling to be tested"
    with torch.no_grad():
        got = hf(**enc).logits[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # one text at a time (no padding at all) gives the same scores
    with torch.no_grad():
        single = torch.stack([hf(**hf_tok([t], return_tensors="pt")).logits[0, 0] for t in texts])
    torch.testing.assert_close(single, expected, atol=1e-5, rtol=1e-5)
    assert (export / "README.md").is_file()


def test_reward_export_refuses_a_head_of_another_size(tmp_path, tok):
    from safetensors.torch import save_file

    from trainers.rlhf.heads import ScoreModel
    from trainers.stages.rm import _export_rm

    _export_rm(ScoreModel(_adapted(tok, seed=2)), tok, tmp_path / "rm")
    save_file({"weight": torch.ones(1, 7), "bias": torch.zeros(1)}, str(tmp_path / "rm" / "head.safetensors"))
    with pytest.raises(ExportError, match="does not fit hidden size 32"):
        export_reward_model(tmp_path / "rm" / "backbone", tmp_path / "rm" / "head.safetensors", tmp_path / "out")


def test_policy_export_generates_like_dpalign_greedily(tmp_path, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _adapted(tok, seed=3)
    merge_and_save(model, tok, tmp_path / "model")  # the SFT/PPO stages' exporter
    ours = generate_continuations(model, tok, PROMPTS, max_new_tokens=12, temperature=0.0, batch_size=4)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    theirs = []
    for prompt in PROMPTS:  # plain Hugging Face usage, one prompt at a time (no padding involved)
        enc = hf_tok(hf_tok.bos_token + prompt, return_tensors="pt")
        with torch.no_grad():
            ids = hf.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=hf_tok.pad_token_id)
        theirs.append(hf_tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    assert theirs == ours
    assert any(t.strip() for t in theirs), "generation produced nothing: the comparison would be vacuous"


LEDGER = {
    "epsilon": 3.9961, "delta": 8.3e-5, "accountant": "pld", "composition": "parallel", "rdp_order": None,
    "stages": {"sft": {"epsilon": 3.9994, "target_epsilon": 4.0, "delta": 8.3e-5, "status": "completed"},
               "rm": {"epsilon": 3.9990, "target_epsilon": 4.0, "delta": 8.3e-5, "status": "completed"}},
}
PRIVATE = {"sft": True, "rm": True, "ppo": True}


def test_model_card_states_the_guarantee():
    card = model_card(stage="rm", kind="reward-model", protection=PRIVATE, ledger_privacy=LEDGER,
                      noise={"secret": True, "description": "secret 256-bit seed"}, preset="private", run_id="run-1")
    assert "ε = 3.996" in card and "δ = 8.3e-05" in card and "`pld` accountant" in card
    assert "Privacy unit: **a user**" in card and "`rm` stage" in card and "run-1" in card
    assert "| sft | 3.999 | 4 |" in card and "| rm | 3.999 | 4 |" in card
    assert "NOT PRIVATE" not in card and "No differential-privacy guarantee" not in card
    assert "AutoModelForSequenceClassification" in card


def test_model_card_says_not_private_for_reproducible_noise_and_public_stages():
    card = model_card(stage="sft", kind="causal-lm", protection=PRIVATE, ledger_privacy=LEDGER,
                      noise={"secret": False, "description": "REPRODUCIBLE", "warning": "NOT PRIVATE: seed"},
                      preset="private", run_id="r")
    assert card.count("NOT PRIVATE") >= 1 and "protect no one" in card
    decoupled = {"sft": False, "rm": True, "ppo": False}
    card = model_card(stage="ppo", kind="causal-lm", protection=decoupled, ledger_privacy=LEDGER,
                      noise={"secret": True, "description": "secret"}, preset="decoupled", run_id="r")
    assert "No differential-privacy guarantee** for the data of sft, ppo" in card
    assert "for the users of rm" in card
    card = model_card(stage="ppo", kind="causal-lm", protection=dict.fromkeys(PRIVATE, False),
                      ledger_privacy=None, noise={"secret": False, "description": "non-private"},
                      preset="nonprivate", run_id="r")
    assert "NOT PRIVATE" not in card and "No differential-privacy guarantee" in card and "ε =" not in card

"""Tokenizer and base model: save/load round trips, untied embeddings, pretraining quality, cache behaviour."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from models_corpus import review_corpus

from trainers.data.config import DataConfig
from trainers.models.base import (
    METRICS_FILE,
    ensure_base_model,
    eval_windows,
    load_base_model,
    pack,
    unigram_perplexity,
)
from trainers.models.config import BaseModelConfig
from trainers.models.tokenizer import EOT, load_tokenizer, padding_side, train_tokenizer

TINY = BaseModelConfig(
    vocab_size=300,
    n_layer=2,
    n_embd=32,
    n_head=2,
    n_positions=64,
    pretrain_seq_len=32,
    pretrain_steps=30,
    pretrain_batch_size=8,
    pretrain_lr=1e-2,
    pretrain_warmup_steps=3,
    eval_max_tokens=4096,
    threads=1,
)
TRAIN = review_corpus(300, seed=0)
VALID = review_corpus(60, seed=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    info = ensure_base_model(
        TINY, DataConfig(), cache_dir=cache, public_train=TRAIN, public_valid=VALID, progress=False
    )
    return cache, info


def test_tokenizer_round_trip_through_save_pretrained(tmp_path):
    tok = train_tokenizer(TRAIN, vocab_size=300, model_max_length=64)
    assert len(tok) == 300
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOT and tok.eos_token_id == 0
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    samples = VALID[:5] + ["Unseen wörds, émojis 🎬 and   spaces\nnewlines."]
    for text in samples:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids
        assert loaded.decode(ids) == text  # byte-level: lossless, even for unseen characters
    assert loaded.padding_side == "right" and loaded.pad_token_id == 0
    with padding_side(loaded, "left"):
        batch = loaded(["a", "the film was"], padding=True)
        assert batch["attention_mask"][0][0] == 0  # padding on the left
    assert loaded.padding_side == "right"


def test_model_round_trip_identical_logits_and_untied(built):
    _, info = built
    model, tok = load_base_model(info.path)
    assert model.config.tie_word_embeddings is False
    wte, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert wte.data_ptr() != head.data_ptr() and not torch.equal(wte, head)
    x = pack(tok, VALID[:4])[None, :48]  # [1, 48]
    again, _ = load_base_model(info.path)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)


def test_fused_activation_is_the_same_function_saved_in_the_config(tmp_path):
    """model.activation=gelu_pytorch_tanh builds GPT-2 with the fused GELU kernel: the same function as gelu_new
    (outputs within float rounding at equal weights), written to config.json so a plain from_pretrained uses it."""
    from transformers.activations import GELUTanh, NewGELUActivation

    from trainers.models.base import build_model

    fused, plain = replace(TINY, activation="gelu_pytorch_tanh"), TINY
    a = build_model(fused, vocab_size=300, eos_token_id=0)
    b = build_model(plain, vocab_size=300, eos_token_id=0)
    assert isinstance(a.transformer.h[0].mlp.act, GELUTanh)
    assert isinstance(b.transformer.h[0].mlp.act, NewGELUActivation)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        la, lb = a(input_ids=x).logits, b(input_ids=x).logits
    assert torch.allclose(la, lb, atol=1e-5) and not torch.equal(la, lb)  # different kernels, same function
    a.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu_pytorch_tanh"
    with pytest.raises(ValueError, match="model.activation"):
        replace(TINY, activation="relu").check()


def test_pretraining_lowers_loss_and_beats_unigram(built):
    _, info = built
    m = info.metrics
    assert info.built and m is not None and m.steps == TINY.pretrain_steps
    assert m.final_loss < m.initial_loss - 1.0
    assert m.ppl < 0.5 * m.unigram_ppl, (m.ppl, m.unigram_ppl)


def test_unigram_perplexity_matches_hand_computation():
    train = torch.tensor([0, 1, 1, 2])
    windows = torch.tensor([[2, 1, 0]])  # targets 1 and 0
    # add-one counts over V=4: [2, 3, 2, 1] / 8
    expected = torch.tensor([3 / 8, 2 / 8]).log().mean().neg().exp().item()
    assert unigram_perplexity(train, windows, vocab_size=4) == pytest.approx(expected)
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(torch.arange(5), seq_len=8, max_tokens=100)


def test_cache_reuse_then_rebuild_on_config_change(built):
    cache, info = built
    marker = Path(info.path) / METRICS_FILE
    stamp = marker.stat().st_mtime_ns
    again = ensure_base_model(
        TINY,
        DataConfig(),
        cache_dir=cache,
        public_train=["never read"],
        public_valid=["never read"],
        progress=False,
    )
    assert again.path == info.path and not again.built and again.metrics == info.metrics
    assert marker.stat().st_mtime_ns == stamp
    changed = ensure_base_model(
        replace(TINY, pretrain_steps=5),
        DataConfig(),
        cache_dir=cache,
        public_train=TRAIN,
        public_valid=VALID,
        progress=False,
    )
    assert changed.built and changed.path != info.path and changed.metrics.steps == 5
    other_data = ensure_base_model(
        replace(TINY, pretrain_steps=5),
        DataConfig(seed=1),
        cache_dir=cache,
        public_train=TRAIN,
        public_valid=VALID,
        progress=False,
    )
    assert other_data.built and other_data.path != changed.path
    leftovers = [p.name for p in (cache / "models").iterdir() if p.name.startswith(".") and p.is_dir()]
    assert leftovers == []  # temp build dirs were renamed or removed

    # A directory whose metrics.json is not a complete build of this version is rebuilt, not trusted.
    stale = Path(changed.path) / METRICS_FILE
    stale.write_text(json.dumps({"ppl": 1.0}))
    rebuilt = ensure_base_model(
        replace(TINY, pretrain_steps=5),
        DataConfig(),
        cache_dir=cache,
        public_train=TRAIN,
        public_valid=VALID,
        progress=False,
    )
    assert rebuilt.built and rebuilt.path == changed.path and rebuilt.metrics.steps == 5


def test_builds_are_deterministic_under_seed(built, tmp_path):
    _, info = built
    twin = ensure_base_model(
        TINY, DataConfig(), cache_dir=tmp_path, public_train=TRAIN, public_valid=VALID, progress=False
    )
    a, _ = load_base_model(info.path)
    b, _ = load_base_model(twin.path)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_name_or_path_loads_through_the_same_code_without_pretraining(built, tmp_path):
    _, info = built
    cfg = replace(TINY, name_or_path=info.path)
    got = ensure_base_model(cfg, DataConfig(), cache_dir=tmp_path, public_train=[], public_valid=[])
    assert got.path == info.path and got.metrics is None and not got.built
    assert not (tmp_path / "models").exists()
    model, tok = load_base_model(got.path)
    assert model.config.n_layer == TINY.n_layer and len(tok) == TINY.vocab_size


def test_public_files_are_read_and_validated_by_the_data_loader(tmp_path):
    train, valid = tmp_path / "public.jsonl", tmp_path / "valid.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in TRAIN))
    valid.write_text("".join(json.dumps({"text": t}) + "\n" for t in VALID))
    cfg = replace(TINY, pretrain_steps=2)
    info = ensure_base_model(cfg, DataConfig(), cache_dir=tmp_path, public_train=train, public_valid=valid)
    assert info.built and info.metrics.train_tokens > 1000

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl.*row 2"):
        ensure_base_model(
            replace(cfg, seed=1), DataConfig(), cache_dir=tmp_path, public_train=bad, public_valid=valid
        )
    with pytest.raises(ValueError, match="set data.public_path and data.public_valid_path"):
        ensure_base_model(
            replace(cfg, seed=2), DataConfig(), cache_dir=tmp_path, public_train="", public_valid=""
        )
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".") and p.is_dir()]
    assert leftovers == []  # failed builds leave no temp directory behind


def test_base_model_cache_ignores_the_private_population():
    """Only the public corpus trains the base model: new users or splits must not retrain it."""
    from launch.config import load_config
    from launch.schema import RunConfig
    from trainers.models.base import base_model_dir

    def path(*overrides: str):
        cfg = load_config(RunConfig, None, list(overrides))
        return base_model_dir(cfg.model, cfg.data, cache_dir="cache")

    assert path() == path("data.num_users=3000", "data.canary_users=5", "data.sft_user_fraction=0.3")
    assert path() != path("data.public_reviews=500")
    assert path() != path("model.n_layer=2")


def test_callers_that_miss_one_base_model_at_once_pretrain_it_once(tmp_path: Path, monkeypatch):
    """Concurrent trials on one node with a cold cache: one pretrains the base model, the others wait for its
    build lock and load it (dpalign.cache.build_lock), instead of each pretraining a copy to throw away."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import trainers.models.base as base_module

    built, real = [], base_module.build_base_model

    def slow_build(*args, **kw):
        built.append(threading.get_ident())
        time.sleep(0.5)  # every caller has checked the cache before the first build ends
        return real(*args, **kw)

    monkeypatch.setattr(base_module, "build_base_model", slow_build)
    cfg = replace(TINY, pretrain_steps=2)
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: ensure_base_model(cfg, DataConfig(), cache_dir=tmp_path, public_train=TRAIN,
                                                        public_valid=VALID, progress=False), range(2)))
    assert len(built) == 1
    assert sorted(i.built for i in got) == [False, True] and got[0].path == got[1].path

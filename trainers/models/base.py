"""The base model: a small GPT-2 (untied embeddings) pretrained on the public corpus, cached, loaded by directory.

Lifecycle. ``ensure_base_model`` returns a directory (or, with ``model.name_or_path``, a hub id / local dir) that
every later stage opens with :func:`load_base_model`, i.e. ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained``: there is one loading path, for our model and a hub ``gpt2`` alike.

Cache. The embedded tokenizer and model are built under ``<cache_dir>/models/<hash>``, with
``hash = config_hash(model_cfg, data_cfg.public_corpus_key())`` (the public corpus that trained them matters as
much as the architecture; the private population does not enter, so changing it keeps the cached model).
A build goes to a temporary directory that is renamed into place when complete, so a crash or a concurrent build
never leaves a half-written model where a reader would find it. A present directory is reused; any config change
gives a new hash and a new build. With ``data.source=files`` the hash covers the file *paths*, not their
contents: edit a file in place and you must clear the cache (or rename the file).

Pretraining. Documents are packed as ``text <EOT> text <EOT> ...``; each step draws ``batch_size`` random windows of
``seq_len`` tokens (seeded generator), AdamW with linear warmup and cosine decay, global grad-norm clipping. The
corpus is public, so none of this is private: no clipping per example, no noise, no ledger.

Evaluation. Held-out perplexity on ``public_valid``: non-overlapping ``seq_len`` windows, loss on every position
but the first of each window. The baseline is an add-one-smoothed unigram over the *train* tokens, scored on
exactly the same target tokens. Measured with the default config on 2 shared CPU cores: see ``metrics.json`` of
a build and the README.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpalign.cache import build_lock
from dpalign.config import config_hash, to_dict
from trainers.models.config import BaseModelConfig
from trainers.models.tokenizer import load_tokenizer, train_tokenizer

METRICS_FILE = "metrics.json"
"""Written last into a built model directory: its presence marks a complete build."""
BUILD_CONFIG_FILE = "build_config.json"
"""The model and data config sections that made a built directory (for humans; the hash is the key)."""

Texts = Sequence[str] | str | os.PathLike
"""Texts in memory, or a JSONL/Parquet file with a ``text`` column (read only when a build is needed)."""


@dataclass(frozen=True)
class PretrainMetrics:
    """What a build measured. Perplexities are per token of our tokenizer, on the same held-out targets."""

    params: int
    """Total parameters of the model (untied: input and output embeddings counted separately)."""
    steps: int
    """Optimizer steps of pretraining."""
    seconds: float
    """Wall time of the pretraining loop alone."""
    cpu_seconds: float
    """CPU time of this process during the pretraining loop (all threads): unlike wall time, it does not grow
    when other jobs share the cores, so it is the number to compare across machines of one CPU type."""
    build_seconds: float
    """Wall time of the whole build: tokenizer, packing, pretraining, evaluation, saving."""
    initial_loss: float
    """Training loss of the first step (about ln(vocab) for a fresh model)."""
    final_loss: float
    """Mean training loss over the last 10% of steps."""
    ppl: float
    """Held-out perplexity of the model on public_valid."""
    unigram_ppl: float
    """Held-out perplexity of the add-one-smoothed unigram over train tokens, on the same targets."""
    train_tokens: int
    """Tokens in the packed public_train corpus."""
    eval_tokens: int
    """Target tokens scored for both perplexities."""
    threads: int
    """torch threads used while pretraining."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PretrainMetrics:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class BaseModelInfo:
    """Where the base model is, and what its build measured."""

    path: str
    """Directory (or hub id) to pass to :func:`load_base_model` / ``from_pretrained``."""
    metrics: PretrainMetrics | None
    """Metrics of the embedded build; None for a model given by ``model.name_or_path`` (not pretrained here)."""
    built: bool
    """True if this call built the model; False if it came from the cache or from name_or_path."""


# --------------------------------------------------------------------------------------------------------------
# Texts and token streams


def _as_texts(texts: Texts, *, what: str) -> list[str]:
    """Texts as a list; a path is read (and validated, naming file and row) by the data package's loader."""
    if isinstance(texts, (str, os.PathLike)):
        if not str(texts):
            raise ValueError(
                f"no {what} file: the embedded base model is pretrained on a public corpus; set data.public_path "
                "and data.public_valid_path (column text), or model.name_or_path to use an existing model"
            )
        from trainers.data.io import load_public

        return list(load_public(texts).rows["text"])
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{what} text {i}: {text!r}; every public text must be a non-empty string")
    return out


def pack(tokenizer: Any, texts: Sequence[str]) -> Tensor:
    """Token ids of ``texts`` concatenated as ``text <EOT> text <EOT> ...``: a [N] int64 stream."""
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)[
        "input_ids"
    ]  # long docs are fine: packed
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for row in ids:
        stream.extend(row)
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


def eval_windows(ids: Tensor, *, seq_len: int, max_tokens: int) -> Tensor:
    """Non-overlapping [W, seq_len] windows of the first ``max_tokens`` of a [N] stream (remainder dropped)."""
    n = min(ids.numel(), max_tokens) // seq_len
    if n == 0:
        raise ValueError(
            f"held-out corpus has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "add public_valid texts or lower model.pretrain_seq_len"
        )
    return ids[: n * seq_len].view(n, seq_len)  # [W, L]


def validation_windows(tokenizer: Any, texts: list[str], *, model_cfg: BaseModelConfig, count: int) -> Tensor:
    """The PUBLIC token windows a run validates on (``count`` windows of up to 64 tokens, in text order): SFT's
    validation loss (the learned controller's reward), PPO's LM loss and the evaluation's perplexity. One
    definition, so the controller benchmark measures the controller on what ``dpalign run`` gives it."""
    seq_len = min(64, model_cfg.n_positions) if not model_cfg.name_or_path else 64
    return eval_windows(pack(tokenizer, texts), seq_len=seq_len, max_tokens=seq_len * count)


# --------------------------------------------------------------------------------------------------------------
# Model, pretraining, evaluation


def build_model(cfg: BaseModelConfig, *, vocab_size: int, eos_token_id: int) -> Any:
    """A freshly initialized GPT-2 (``GPT2LMHeadModel``) with untied input/output embeddings, seeded by cfg.seed.

    Untied, because LoRA/DP stages adapt attention only and an untied output head keeps the input embedding
    table from moving when a head is later trained; it also matches the issue's contract.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function=cfg.activation,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def _lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain(model: Any, train_ids: Tensor, cfg: BaseModelConfig, *, progress: bool = True) -> list[float]:
    """Pretrain ``model`` in place on random windows of the [N] token stream; returns the per-step losses.

    Deterministic under ``cfg.seed`` for a given thread count (the window order comes from a seeded generator).
    """
    from tqdm.auto import tqdm

    seq_len, batch = cfg.pretrain_seq_len, cfg.pretrain_batch_size
    if train_ids.numel() <= seq_len + 1:
        raise ValueError(
            f"public_train has {train_ids.numel()} tokens, not more than one window of {seq_len}; "
            "add public texts (data.public_reviews) or lower model.pretrain_seq_len"
        )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorm gains
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.pretrain_weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.pretrain_lr,
        betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, warmup=cfg.pretrain_warmup_steps, total=cfg.pretrain_steps)
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(seq_len)  # [L]
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        starts = torch.randint(0, train_ids.numel() - seq_len, (batch,), generator=gen)  # [B]
        x = train_ids[starts[:, None] + offsets]  # [B, L]
        loss = model(
            input_ids=x, attention_mask=torch.ones_like(x), labels=x
        ).loss  # HF shifts labels: predicts x[:, 1:] from x[:, :-1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.pretrain_grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}", refresh=False)
    model.eval()
    return losses


@torch.no_grad()
def heldout_perplexity(model: Any, windows: Tensor, *, batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over [W, L] windows, every position but the first of each window a target."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size]  # [b, L]
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, :-1]  # [b, L-1, V]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += x[:, 1:].numel()
    return math.exp(total / count)


def unigram_perplexity(train_ids: Tensor, windows: Tensor, *, vocab_size: int) -> float:
    """Perplexity of add-one-smoothed unigram frequencies of ``train_ids`` on the targets of [W, L] windows."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0  # [V]
    logp = counts.log() - counts.sum().log()  # [V]
    targets = windows[:, 1:].reshape(-1)  # same targets as heldout_perplexity
    return math.exp(float(-logp[targets].mean()))


# --------------------------------------------------------------------------------------------------------------
# Build, cache, load


def load_base_model(name_or_path: str | os.PathLike) -> tuple[Any, Any]:
    """(model, tokenizer) from a directory or hub id, only through ``from_pretrained``; model in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(name_or_path))
    tokenizer = load_tokenizer(name_or_path)
    model.eval()
    return model, tokenizer


def base_model_dir(model_cfg: BaseModelConfig, data_cfg: Any, *, cache_dir: str | os.PathLike) -> Path:
    """``<cache_dir>/models/<hash>``: where the embedded build lives, keyed by the model config and the fields of
    the data config that determine the public corpus."""
    return Path(cache_dir) / "models" / config_hash(model_cfg, data_cfg.public_corpus_key())


def build_base_model(
    model_cfg: BaseModelConfig,
    out_dir: str | os.PathLike,
    *,
    public_train: Texts,
    public_valid: Texts,
    progress: bool = True,
) -> PretrainMetrics:
    """Train the tokenizer, pretrain the model, evaluate, and ``save_pretrained`` both into ``out_dir``.

    No caching here: see :func:`ensure_base_model`.
    """
    started = time.perf_counter()
    train_texts = _as_texts(public_train, what="public_train")
    valid_texts = _as_texts(public_valid, what="public_valid")
    tokenizer = train_tokenizer(
        train_texts,
        vocab_size=model_cfg.vocab_size,
        min_frequency=model_cfg.tokenizer_min_frequency,
        model_max_length=model_cfg.n_positions,
    )
    vocab = len(tokenizer)
    train_ids, valid_ids = pack(tokenizer, train_texts), pack(tokenizer, valid_texts)
    windows = eval_windows(
        valid_ids, seq_len=model_cfg.pretrain_seq_len, max_tokens=model_cfg.eval_max_tokens
    )

    previous_threads = torch.get_num_threads()
    threads = model_cfg.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    try:
        model = build_model(model_cfg, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id)
        t0, c0 = time.perf_counter(), time.process_time()
        losses = pretrain(model, train_ids, model_cfg, progress=progress)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        ppl = heldout_perplexity(model, windows)
    finally:
        torch.set_num_threads(previous_threads)
    unigram = unigram_perplexity(train_ids, windows, vocab_size=vocab)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tail = losses[-max(1, len(losses) // 10) :] if losses else [float("nan")]
    metrics = PretrainMetrics(
        params=sum(p.numel() for p in model.parameters()),
        steps=len(losses),
        seconds=round(seconds, 2),
        cpu_seconds=round(cpu_seconds, 2),
        build_seconds=round(time.perf_counter() - started, 2),
        initial_loss=losses[0] if losses else float("nan"),
        final_loss=sum(tail) / len(tail),
        ppl=ppl,
        unigram_ppl=unigram,
        train_tokens=int(train_ids.numel()),
        eval_tokens=int(windows[:, 1:].numel()),
        threads=threads,
    )
    (out / METRICS_FILE).write_text(json.dumps(metrics.to_json(), indent=2) + "\n")
    return metrics


def read_metrics(model_dir: str | os.PathLike) -> PretrainMetrics | None:
    """The metrics.json of a complete build; None if absent or written by an older, incompatible version."""
    path = Path(model_dir) / METRICS_FILE
    try:
        return PretrainMetrics.from_json(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None


def ensure_base_model(
    model_cfg: BaseModelConfig,
    data_cfg: Any,
    *,
    cache_dir: str | os.PathLike,
    public_train: Texts,
    public_valid: Texts,
    progress: bool = True,
) -> BaseModelInfo:
    """The base model's location: ``model_cfg.name_or_path`` if set, else the cached (or freshly built) build.

    Args:
        model_cfg: the ``model`` config section.
        data_cfg: the ``data`` config section (part of the cache key: the data that trained the model).
        cache_dir: the run's cache root (``run.cache_dir``); the build lives in ``<cache_dir>/models/<hash>``.
        public_train / public_valid: public texts, or JSONL/Parquet paths with a ``text`` column; read only
            when a build is needed.
        progress: show a progress bar while pretraining.
    """
    if model_cfg.name_or_path:
        return BaseModelInfo(path=model_cfg.name_or_path, metrics=None, built=False)
    final = base_model_dir(model_cfg, data_cfg, cache_dir=cache_dir)
    cached = read_metrics(final)
    if cached is not None:
        return BaseModelInfo(path=str(final), metrics=cached, built=False)
    with build_lock(final):  # one build per node: concurrent callers wait for it, then read it
        cached = read_metrics(final)
        if cached is not None:
            return BaseModelInfo(path=str(final), metrics=cached, built=False)
        return _build_into(final, model_cfg, data_cfg, public_train=public_train, public_valid=public_valid,
                           progress=progress)


def _build_into(final: Path, model_cfg: BaseModelConfig, data_cfg: Any, *, public_train: Texts,
                public_valid: Texts, progress: bool) -> BaseModelInfo:
    """Build the base model into a temporary directory next to ``final`` and rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        metrics = build_base_model(
            model_cfg, tmp, public_train=public_train, public_valid=public_valid, progress=progress
        )
        (tmp / BUILD_CONFIG_FILE).write_text(
            json.dumps({"model": to_dict(model_cfg), "data": to_dict(data_cfg)}, indent=2, default=str) + "\n"
        )
        if final.exists() and read_metrics(final) is None:
            shutil.rmtree(final)  # incomplete (a manual copy) or from an older dpalign version: replace it
        try:
            os.rename(tmp, final)  # atomic on one filesystem: readers see all of it or nothing
        except OSError:
            theirs = read_metrics(final)
            if theirs is None:
                raise
            # A concurrent build the lock did not reach (another node) finished first; it is equivalent, keep it.
            return BaseModelInfo(path=str(final), metrics=theirs, built=False)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return BaseModelInfo(path=str(final), metrics=metrics, built=True)

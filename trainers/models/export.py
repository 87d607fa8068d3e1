"""Exports other RLHF tools load by path, each with a model card that carries its privacy guarantee.

* :func:`export_reward_model`: the reward-model stage's output (``backbone/``: SFT + RM LoRA merged, and
  ``head.safetensors``) as a standard ``AutoModelForSequenceClassification`` directory with ``num_labels=1``
  (``GPT2ForSequenceClassification`` for GPT-2), so TRL's and OpenRLHF's reward-model loaders open it by path
  and score exactly what dpalign's :class:`trainers.rlhf.heads.ScoreModel` scores.
* The policies (``stages/sft/model``, ``stages/ppo/model``) are already merged causal LMs
  (:func:`trainers.models.lora.merge_and_save`); they only get a model card.
* :func:`write_model_card`: ``README.md`` in an export directory stating epsilon, delta, the accountant, the
  privacy unit, the stage and whether the noise was secret, so the guarantee travels with the weights.

Two details make the sequence-classification export score exactly like dpalign:

* **Pooling.** Hugging Face's sequence classifiers pool at the rightmost token that is not ``pad_token_id``.
  dpalign's tokenizer (and hub GPT-2's, once it can pad) pads with ``<|endoftext|>``, which is also the EOS that
  ends every scored text (``BOS + prompt + completion + EOS``, the layout the reward model was trained on):
  with ``pad_token_id`` = EOS the classifier would pool one token early. The export adds a dedicated pad token
  (``<|pad|>``, one new embedding row that only padding ever reads) and sets ``pad_token_id`` to it, so the pooled
  token is the last real one, as in ``ScoreModel`` (which reads the attention mask).
* **The head's bias.** ``GPT2ForSequenceClassification.score`` is ``Linear(hidden, 1, bias=False)``; dpalign's
  head has a bias b. The score reads the final layer norm's output ``h = g * n + beta``; in the exported
  classifier (which has no LM head sharing that norm) ``beta`` becomes ``beta + b * w / ||w||^2``, so
  ``w . h`` gains exactly b. An architecture whose final norm has no bias is refused (the shift cannot be folded).

Positions: dpalign counts positions from each row's first real token; the Hugging Face model counts from column
0, which agrees for RIGHT padding (TRL's and OpenRLHF's reward collators pad on the right). The model card says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

PAD_TOKEN = "<|pad|>"
"""The dedicated padding token of a sequence-classification export (never part of a scored text)."""

STAGE_DATA = {
    "sft": "D1, demonstrations (prompt, response) of private users",
    "rm": "D2, pairwise preferences (prompt, chosen, rejected) of private users",
    "ppo": "D3, prompts of private users (rollouts scored by the reward model of the rm stage)",
}
"""What each stage trains on, for the model cards."""

UPSTREAM = {"sft": ("sft",), "rm": ("sft", "rm"), "ppo": ("sft", "rm", "ppo")}
"""The stages whose private data a stage's weights depend on (its initialization and its reward model)."""


class ExportError(ValueError):
    """A model cannot be exported in the standard layout (names the reason and what to do)."""


def _final_norm(body: nn.Module) -> nn.Module:
    """The final normalization of a transformer body (GPT-2 ``ln_f``, Llama-style ``norm``, OPT-style ...)."""
    for name in ("ln_f", "norm", "final_layer_norm", "final_layernorm"):
        module = getattr(body, name, None)
        if isinstance(module, nn.Module):
            return module
    decoder = getattr(body, "decoder", None)
    if isinstance(decoder, nn.Module):
        return _final_norm(decoder)
    raise ExportError(f"{type(body).__name__}: no final normalization module (ln_f/norm) to fold the score bias into")


def _load_head(head_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(head_path))
    if set(state) != {"weight", "bias"} or state["weight"].shape[0] != 1:
        raise ExportError(f"{head_path}: expected a scalar head (weight [1, H], bias [1]), got {sorted(state)}")
    return state["weight"].float(), state["bias"].float()


def export_reward_model(backbone_dir: str | os.PathLike, head_path: str | os.PathLike,
                        out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir`` as an ``AutoModelForSequenceClassification`` (num_labels=1) that scores like ScoreModel.

    Args:
        backbone_dir: the reward model's merged causal LM and tokenizer (the RM stage's ``backbone/``).
        head_path: its scalar head (``head.safetensors``: weight [1, H], bias [1]).
        out_dir: the export directory (created; model, config with ``pad_token_id``, tokenizer).

    Raises:
        ExportError: the head does not fit the backbone, or the architecture's final norm has no bias.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    backbone_dir, out = Path(backbone_dir), Path(out_dir)
    lm = AutoModelForCausalLM.from_pretrained(str(backbone_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(backbone_dir))
    weight, bias = _load_head(Path(head_path))
    hidden = lm.config.hidden_size
    if weight.shape != (1, hidden):
        raise ExportError(f"{head_path}: head weight {tuple(weight.shape)} does not fit hidden size {hidden}")

    # A pad token that no scored text contains (see the module docstring: pooling).
    ends = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in ends:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "right"

    config = lm.config.__class__.from_dict(lm.config.to_dict())
    config.num_labels = 1
    config.problem_type = "regression"
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    config.pad_token_id = tokenizer.pad_token_id
    seq = AutoModelForSequenceClassification.from_config(config)
    config.architectures = [type(seq).__name__]
    seq.base_model.load_state_dict(lm.base_model.state_dict())
    if len(tokenizer) > seq.get_input_embeddings().weight.shape[0]:
        seq.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():  # the pad row is only ever read at masked/padding positions; make it inert
            seq.get_input_embeddings().weight[len(tokenizer) - 1:].zero_()
    score = getattr(seq, "score", None)
    if not isinstance(score, nn.Linear) or score.weight.shape != (1, hidden):
        raise ExportError(f"{type(seq).__name__}: no score head Linear(hidden, 1) to map dpalign's head onto")
    norm = _final_norm(seq.base_model)
    norm_bias = getattr(norm, "bias", None)
    w = weight[0]
    if float(bias.abs().max()) != 0.0:
        if not isinstance(norm_bias, torch.Tensor):
            raise ExportError(
                f"{type(seq).__name__}: the final norm has no bias, so the reward head's bias {float(bias[0]):.4g} "
                "cannot be folded into a bias-free score head; use dpalign's loader (load_reward_model) instead"
            )
        norm_sq = float(w @ w)
        if norm_sq <= 0.0:
            raise ExportError(f"{head_path}: the head's weight is zero; nothing to export")
        with torch.no_grad():
            norm_bias.add_((float(bias[0]) / norm_sq) * w.to(norm_bias.dtype))
    with torch.no_grad():
        score.weight.copy_(weight.to(score.weight.dtype))
        if score.bias is not None:  # an architecture whose classifier has a bias: nothing to fold
            score.bias.zero_()
    out.mkdir(parents=True, exist_ok=True)
    seq.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "—" if x is None else format(float(x), spec)


def model_card(
    *,
    stage: str,
    kind: str,
    protection: Mapping[str, bool],
    ledger_privacy: Mapping[str, Any] | None,
    noise: Mapping[str, Any],
    preset: str,
    run_id: str,
) -> str:
    """The text of an export's ``README.md``: what the weights were trained on and the privacy guarantee they carry.

    Args:
        stage: "sft", "rm" or "ppo" (the stage that produced the weights).
        kind: "causal-lm" or "reward-model" (decides the usage snippet).
        protection: stage -> whether it was trained with DP (the preset's protection).
        ledger_privacy: ``Ledger.report()`` read when the stage committed (so it covers exactly this stage and the
            ones before it), or None when no stage is private.
        noise: ``trainers.stages.context.noise_disclosure(cfg)`` (secret or reproducible; never the seed).
        preset: ``privacy.preset``.
        run_id: the run's id (the ledger that backs the numbers).
    """
    upstream = UPSTREAM[stage]
    private = [s for s in upstream if protection.get(s)]
    public = [s for s in upstream if not protection.get(s)]
    stages = (ledger_privacy or {}).get("stages", {})
    secret = bool(noise.get("secret")) or not private
    lines = [
        "---",
        "library_name: transformers",
        "tags: [dpalign, differential-privacy, rlhf" + (", reward-model" if kind == "reward-model" else "") + "]",
        "---",
        "",
        f"# dpalign {stage} export ({'reward model' if kind == 'reward-model' else 'policy'})",
        "",
        f"Produced by the `{stage}` stage of dpalign run `{run_id}` (privacy preset `{preset}`). The weights depend "
        f"on the data of: {', '.join(f'{s} ({STAGE_DATA[s]})' for s in upstream)}.",
        "",
        "## Privacy",
        "",
    ]
    if not secret:
        lines += [f"**NOT PRIVATE.** {noise.get('warning') or noise.get('description')}. The numbers below are what "
                  "the ledger accounted, but they protect no one: the noise can be regenerated from the public seed.",
                  ""]
    if private and ledger_privacy is not None:
        lines += [
            "Privacy unit: **a user** (adding or removing all records of one user). Differential privacy "
            f"guarantee of these weights: **(ε = {_fmt(ledger_privacy.get('epsilon'), '.3f')}, "
            f"δ = {_fmt(ledger_privacy.get('delta'), '.3g')})** for the users of "
            f"{', '.join(private)}, computed by dp-accounting's `{ledger_privacy.get('accountant')}` accountant from "
            f"the run's ledger (`{ledger_privacy.get('composition')}` composition over the stages so far"
            + (f", RDP order {ledger_privacy.get('rdp_order')}" if ledger_privacy.get("rdp_order") else "")
            + "). `dpalign privacy verify RUN_DIR` recomputes it from `ledger.jsonl`.",
            "",
            "| stage | ε spent | target ε | δ | status |",
            "|---|---|---|---|---|",
        ]
        for s in private:
            e = stages.get(s, {})
            lines.append(f"| {s} | {_fmt(e.get('epsilon'), '.3f')} | {_fmt(e.get('target_epsilon'), 'g')} | "
                         f"{_fmt(e.get('delta'), '.3g')} | {e.get('status', '—')} |")
        lines += ["", f"Noise: {noise.get('description')}.", ""]
    if public:
        lines += [f"**No differential-privacy guarantee** for the data of {', '.join(public)}: the preset "
                  f"`{preset}` trains {'it' if len(public) == 1 else 'them'} without noise (treated as public).", ""]
    lines += ["## Usage", ""]
    if kind == "reward-model":
        lines += [
            "```python",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "model = AutoModelForSequenceClassification.from_pretrained(PATH)  # num_labels=1",
            "tok = AutoTokenizer.from_pretrained(PATH)                        # pads on the right with <|pad|>",
            "text = tok.eos_token + prompt + completion + tok.eos_token          # the layout it was trained on",
            "reward = model(**tok([text], return_tensors='pt')).logits[0, 0]",
            "```",
            "",
            "Score `BOS + prompt + completion + EOS` (dpalign's tokenizer adds no special tokens itself), padded on "
            "the right: the classifier pools the last token that is not `<|pad|>`, the EOS, as dpalign's scorer "
            "does. Scores equal dpalign's reward model's (`trainers.stages.rm.load_reward_model`) to float "
            "precision; the head's bias is folded into the final layer norm's bias.",
        ]
    else:
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained(PATH)",
            "tok = AutoTokenizer.from_pretrained(PATH)",
            "ids = tok(tok.bos_token + prompt, return_tensors='pt')  # the context the model was trained in",
            "out = model.generate(**ids, max_new_tokens=48, do_sample=False)",
            "```",
            "",
            "The LoRA adapter is merged; prompts are prefixed with `<|endoftext|>` as in training, and batched "
            "generation pads on the left.",
        ]
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | os.PathLike, text: str) -> Path:
    """Write ``directory/README.md`` (the model card Hugging Face tools show)."""
    path = Path(directory) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def write_stage_exports(
    stage: str,
    stage_dir: str | os.PathLike,
    *,
    protection: Mapping[str, bool],
    ledger_privacy: Mapping[str, Any] | None,
    noise: Mapping[str, Any],
    preset: str,
    run_id: str,
) -> list[Path]:
    """After a stage's learner has written its outputs: the standard exports of ``stage_dir`` and their cards.

    sft, ppo: ``model/`` (merged causal LM) gets a card. rm: ``model/`` is written by
    :func:`export_reward_model` from ``backbone/`` and ``head.safetensors``, with a card. Returns the export
    directories. Called by the pipeline inside the stage's atomic commit, so a committed stage has its exports.
    """
    stage_dir = Path(stage_dir)
    export = stage_dir / "model"
    kind = "causal-lm"
    if stage == "rm":
        export_reward_model(stage_dir / "backbone", stage_dir / "head.safetensors", export)
        kind = "reward-model"
    if not (export / "config.json").is_file():
        raise ExportError(f"{export}: no config.json; the {stage} stage did not write its merged model")
    write_model_card(export, model_card(stage=stage, kind=kind, protection=protection,
                                        ledger_privacy=ledger_privacy, noise=noise, preset=preset, run_id=run_id))
    return [export]

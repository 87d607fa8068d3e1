"""The three models DP-PPO runs: the trainable actor-critic (SFT + a new LoRA + a value head) and the two frozen
scorers (the SFT reference, the private reward model). Building them is seeded, so every learner rank and a
rebuilt export start from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.rlhf.heads import (
    PolicyValueModel,
    ScoreModel,
)


@dataclass
class PPOModels:
    """Everything DP-PPO runs: the trainable actor-critic and the two frozen scorers.

    Attributes:
        actor: ``PolicyValueModel(SFT + new LoRA)``; trainable: the LoRA A/B tensors and the value head.
        reference: the SFT model, frozen (eval mode, no grad): the KL anchor.
        reward: the private reward model (``ScoreModel`` with the RM stage's head), frozen.
        tokenizer: the SFT model's tokenizer (shared by all three: they come from one base model).
    """

    actor: PolicyValueModel
    reference: nn.Module
    reward: ScoreModel
    tokenizer: Any

    @property
    def policy(self) -> nn.Module:
        """The peft-wrapped causal LM inside the actor (what generates and what is exported)."""
        return self.actor.policy

    @property
    def device(self) -> torch.device:
        return next(self.actor.parameters()).device

    def to(self, device: str | torch.device) -> PPOModels:
        """All three models on ``device`` (a learner rank's)."""
        self.actor.to(device)
        self.reference.to(device)
        self.reward.to(device)
        return self


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def check_model_dirs(*, sft_dir: Path, rm_dir: Path) -> None:
    """Fail on missing stage outputs before the ledger hears of the stage (the driver calls it before begin_stage).

    Raises:
        FileNotFoundError: ``sft_dir`` is not a saved model, or ``rm_dir`` lacks ``backbone/`` or the head file.
    """
    sft_dir, rm_dir = Path(sft_dir), Path(rm_dir)
    if not (sft_dir / "config.json").is_file():
        raise FileNotFoundError(f"sft_dir {sft_dir}: no config.json; pass the SFT stage's merged export (model/)")
    if not (rm_dir / "backbone" / "config.json").is_file() or not (rm_dir / "head.safetensors").is_file():
        raise FileNotFoundError(
            f"rm_dir {rm_dir}: expected backbone/ (merged HF model) and head.safetensors from the reward-model stage"
        )


def build_actor(*, sft_dir: Path, lora: Any, seed: int) -> PolicyValueModel:
    """SFT model + a new LoRA + a value head, in eval mode; the random draws (LoRA A, value head) are seeded by the
    stage seed, so every rank (and a rebuilt export model) starts from the same weights."""
    from transformers import AutoModelForCausalLM

    from trainers.models.lora import add_lora

    torch.manual_seed(seed)  # the new LoRA's A and the value head: one draw per stage seed
    policy = add_lora(
        AutoModelForCausalLM.from_pretrained(str(sft_dir)),
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=tuple(lora.target_modules),
    )
    actor = PolicyValueModel(policy)
    actor.eval()  # no dropout anywhere: deterministic per-user gradients, PPO ratio exactly 1 at epoch 0
    return actor


def load_ppo_models(*, sft_dir: Path, rm_dir: Path, lora: Any, seed: int) -> PPOModels:
    """Build the actor (SFT + new LoRA of shape ``lora`` (``ppo.lora``) + value head, seeded by ``seed``, the stage
    seed), the frozen reference and the RM.

    Raises:
        FileNotFoundError: ``sft_dir`` is not a saved model, or ``rm_dir`` lacks ``backbone/`` or the head file.
    """
    from transformers import AutoModelForCausalLM

    from trainers.models.tokenizer import load_tokenizer

    sft_dir, rm_dir = Path(sft_dir), Path(rm_dir)
    check_model_dirs(sft_dir=sft_dir, rm_dir=rm_dir)
    tokenizer = load_tokenizer(sft_dir)
    actor = build_actor(sft_dir=sft_dir, lora=lora, seed=seed)
    reference = _freeze(AutoModelForCausalLM.from_pretrained(str(sft_dir)))
    reward = ScoreModel(AutoModelForCausalLM.from_pretrained(str(rm_dir / "backbone")))
    reward.load_head(rm_dir / "head.safetensors")
    _freeze(reward)
    return PPOModels(actor=actor, reference=reference, reward=reward, tokenizer=tokenizer)

"""Scalar heads on a causal LM backbone: the reward model's score and PPO's value.

Both read the final hidden state (after the last layer norm) of a Hugging Face causal LM:
  * ``ScoreModel`` reads it at the LAST non-pad token of each sequence and maps it to one scalar (the reward);
  * ``PolicyValueModel`` returns the LM logits and one value per position from the same forward pass
    (TRL's ``AutoModelForCausalLMWithValueHead``: policy and critic share the backbone, so one DP step trains both
    and there is one per-user gradient to clip).

LoRA: attach a peft adapter to the backbone (``ScoreModel(get_peft_model(lm, cfg))``), or to the whole wrapper
with ``modules_to_save=["head"]``. The head is a plain ``nn.Linear`` outside the backbone, so with the first
form it stays trainable while peft freezes the backbone's base weights. Nothing here mixes records: no batch
norm, no pooling across rows; ``position_ids`` come from each row's own mask.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


def last_token_index(attention_mask: Tensor, *, validate: bool = True) -> Tensor:
    """Index of the last real (mask = 1) token of each row, for left OR right padding.

    Args:
        attention_mask: [R, T] 0/1.
        validate: refuse rows without a real token. Model forward passes use False: the check is
            data-dependent control flow, which per-sample-gradient engines built on ``torch.func.vmap`` cannot
            trace (an empty row then reads column T - 1, harmlessly; validate at tokenization instead).

    Returns:
        [R] int64 column index.

    Raises:
        ValueError: a row has no real token (nothing to read a score from).
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [R, T], got {tuple(attention_mask.shape)}")
    am = attention_mask.long()
    empty = am.sum(dim=1) == 0
    if validate and empty.any():
        raise ValueError(f"attention_mask row {int(empty.nonzero()[0])} has no real token")
    T = am.shape[1]
    # argmax returns the FIRST maximum, so flip to find the last 1.
    return (T - 1 - am.flip(dims=[1]).argmax(dim=1)).long()  # [R]


def position_ids_from_attention_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count only real tokens: 0 at each row's first real token.

    GPT-2 uses absolute position embeddings and Hugging Face ``generate`` derives positions from the mask, so a
    LEFT-padded rollout must be re-scored with the same positions, or the learner's log-probs differ from the
    sampler's and the PPO ratio is wrong from the first step. Padding positions get 0 (they are masked anyway).

    Args:
        attention_mask: [R, T] 0/1.

    Returns:
        [R, T] int64.
    """
    am = attention_mask.long()
    return (am.cumsum(dim=1) - 1).clamp(min=0)  # [R, T]


def _body(backbone: nn.Module) -> nn.Module:
    """The transformer body (no LM head) of a causal LM, a peft-wrapped causal LM, or a bare base model.

    peft injects LoRA layers in place, so calling the body of the wrapped model uses the adapters. Calling the
    body rather than the LM skips the [R, T, V] logits the score head does not need.
    """
    model = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    return getattr(model, "base_model", model)


def _hidden_size(backbone: nn.Module) -> int:
    config = getattr(_body(backbone), "config", None)
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ValueError("backbone has no config.hidden_size; pass a Hugging Face causal LM or base model")
    return int(size)


class ScoreModel(nn.Module):
    """Reward model: causal LM backbone + linear head on the last non-pad token's final hidden state.

    Attributes:
        backbone: the causal LM (optionally peft-wrapped). Its LM head is unused.
        head: nn.Linear(hidden, 1), trainable.
    """

    def __init__(self, backbone: nn.Module, *, head_init_std: float | None = None) -> None:
        """Args:
        backbone: a Hugging Face causal LM (e.g. the SFT model), possibly wrapped by peft.
        head_init_std: std of the head's normal init; default 1/sqrt(hidden+1) (as TRL's value head), so
            initial scores are O(1) and the first BT gradients are neither vanishing nor saturated.
        """
        super().__init__()
        self.backbone = backbone
        hidden = _hidden_size(backbone)
        self.head = nn.Linear(hidden, 1)
        std = head_init_std if head_init_std is not None else 1.0 / (hidden + 1) ** 0.5
        nn.init.normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Score each sequence.

        Args:
            input_ids: [R, T] int64, left- or right-padded.
            attention_mask: [R, T] 0/1.

        Returns:
            [R] float scores.
        """
        hidden = _body(self.backbone)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_attention_mask(attention_mask),
        ).last_hidden_state  # [R, T, H]
        idx = last_token_index(attention_mask, validate=False)  # [R]
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # [R, H]
        return self.head(last).squeeze(-1)  # [R]

    def save_head(self, path: str | Path) -> None:
        """Write the head's weights (the backbone's adapter is saved by peft, separately)."""
        save_head(self.head, path)

    def load_head(self, path: str | Path) -> None:
        """Load weights written by ``save_head``; refuses a head of another hidden size."""
        load_head(self.head, path)


class PolicyValueModel(nn.Module):
    """PPO actor-critic: the causal LM's logits and a scalar value per position, from one forward pass.

    ``values[:, t]`` estimates the return from the state "tokens 0..t seen", i.e. the value of the state in
    which token t+1 is chosen; it therefore lines up with ``logits[:, t]`` (see
    ``trainers.rlhf.experience.response_slice``).

    Attributes:
        policy: the causal LM (optionally peft-wrapped); gives logits.
        head: nn.Linear(hidden, 1), the value head.
    """

    def __init__(self, policy: nn.Module, *, head_init_std: float | None = None) -> None:
        super().__init__()
        self.policy = policy
        hidden = _hidden_size(policy)
        self.head = nn.Linear(hidden, 1)
        std = head_init_std if head_init_std is not None else 1.0 / (hidden + 1) ** 0.5
        nn.init.normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Args:
            input_ids: [R, S] int64 (prompt left-padded, response right-padded is fine).
            attention_mask: [R, S] 0/1.

        Returns:
            (logits [R, S, V], values [R, S]).
        """
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_attention_mask(attention_mask),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]  # [R, S, H], after the final layer norm
        return out.logits, self.head(hidden).squeeze(-1)

    def save_head(self, path: str | Path) -> None:
        """Write the value head's weights."""
        save_head(self.head, path)

    def load_head(self, path: str | Path) -> None:
        """Load weights written by ``save_head``."""
        load_head(self.head, path)


def save_head(head: nn.Linear, path: str | Path) -> None:
    """Save a scalar head as a safetensors file (no pickle: a head file is safe to load from anywhere)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path))


def load_head(head: nn.Linear, path: str | Path) -> None:
    """Load a head saved by ``save_head`` into ``head``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the saved head has another shape (a head trained on another backbone).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head file {path} not found (written by save_head after the RM/PPO stage)")
    state = load_file(str(path))
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise ValueError(f"head file {path} holds {got}, but this model's head is {expected}: another backbone?")
    with torch.no_grad():
        head.load_state_dict({k: v.to(head.weight.device) for k, v in state.items()})

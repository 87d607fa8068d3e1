"""How a prompt and a response become model text, in one place: plain ``BOS + prompt`` or the tokenizer's chat
template (``data.chat_template``).

Every stage and the evaluation build their text through these functions: SFT's demonstrations
(:func:`prompt_text` + :func:`response_text` + EOS), the reward model's ``prompt + completion + EOS``
(``trainers.stages.rm.rm_texts``), and every generation -- PPO rollouts, the public evaluation, the reward
normalization -- (``trainers.rollout.generate_rollouts``, which encodes :func:`prompt_text`). So the layout the
reward model scores is the layout PPO generates in, with or without a template.

The decision is the tokenizer's: with a ``chat_template`` the prompt is the user turn formatted by
``apply_chat_template(..., add_generation_prompt=True)`` and the response is what the template adds for the
assistant turn (its end-of-turn marker included); without one, the context every pretraining document had
(``BOS + prompt``) and the raw response. ``data.chat_template=none`` removes the template from the tokenizer the
SFT stage starts from (:func:`configure_chat`); the SFT export saves that tokenizer, and every later stage loads
its tokenizer from the SFT export, so one setting decides for the whole run.
"""

from __future__ import annotations

from typing import Any, Literal

ChatMode = Literal["auto", "none"]


def configure_chat(tokenizer: Any, mode: str) -> Any:
    """Apply ``data.chat_template`` to ``tokenizer`` (in place; returned): ``auto`` keeps its template (if any),
    ``none`` removes it so the plain ``BOS + prompt`` layout is used."""
    if mode not in ("auto", "none"):
        raise ValueError(f"data.chat_template={mode!r}: expected 'auto' or 'none'")
    if mode == "none" and getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = None
    return tokenizer


def uses_chat(tokenizer: Any) -> bool:
    """Whether text for this tokenizer goes through its chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The context a response follows: the chat template's user turn and generation prompt, else ``BOS + prompt``."""
    if uses_chat(tokenizer):
        return tokenizer.apply_chat_template(_user(prompt), tokenize=False, add_generation_prompt=True)
    return (tokenizer.bos_token or tokenizer.eos_token) + prompt


def response_text(tokenizer: Any, prompt: str, response: str) -> str:
    """What follows :func:`prompt_text` for ``response`` (callers append EOS, as without a template).

    With a template: the assistant turn as the template renders it after the generation prompt, its end-of-turn
    marker included, without a trailing EOS (the callers add exactly one) or trailing whitespace.

    Raises:
        ValueError: the template does not render the prompt as a prefix of the whole conversation (then the
            response cannot be separated from the prompt for the loss mask); set ``data.chat_template=none``.
    """
    if not uses_chat(tokenizer):
        return response
    head = prompt_text(tokenizer, prompt)
    full = tokenizer.apply_chat_template(_user(prompt) + [{"role": "assistant", "content": response}],
                                         tokenize=False)
    if not full.startswith(head):
        raise ValueError(
            "the tokenizer's chat template does not render the user turn + generation prompt as a prefix of the "
            "conversation, so the response cannot be told apart from the prompt; set data.chat_template=none"
        )
    rest = full[len(head):].rstrip()
    eos = tokenizer.eos_token
    if eos and rest.endswith(eos):
        rest = rest[: -len(eos)].rstrip()
    return rest

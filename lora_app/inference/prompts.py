"""Turning what the user typed into model input ids.

Chat mode renders ``[system] + history + the new user turn`` through the tokenizer's own chat
template with the assistant prompt appended, so an instruct model sees exactly the format it was
trained on (and an adapter trained by our data pipeline, which uses the same template, too). Raw mode
is plain text completion, for base models and for checking what an adapter does without a template.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from lora_app.data.templates import TOKENIZER_TEMPLATE, ChatTemplate, SystemPrompt, template_system_prompt
from lora_app.errors import InferenceError

ROLES = ("system", "user", "assistant")


def normalize_history(history: Iterable | None) -> list[dict]:
    """Earlier turns as ``[{"role", "content"}]``. Accepts that form (Gradio's "messages" history,
    extra keys ignored) and ``(user, assistant)`` pairs (Gradio's older "tuples" history)."""
    messages: list[dict] = []
    for turn in history or ():
        if isinstance(turn, dict):
            role, content = turn.get("role"), turn.get("content")
            if role not in ROLES:
                raise InferenceError(f"a history turn has role {role!r}; expected one of {', '.join(ROLES)}.")
            if not isinstance(content, str):  # files, images, components: not text, so not for this model
                continue
            messages.append({"role": role, "content": content})
        elif isinstance(turn, Sequence) and not isinstance(turn, str) and len(turn) == 2:
            user, assistant = turn
            if user:
                messages.append({"role": "user", "content": str(user)})
            if assistant:
                messages.append({"role": "assistant", "content": str(assistant)})
        else:
            raise InferenceError(f"cannot read history turn {turn!r}: give {{'role', 'content'}} dicts or pairs.")
    return messages


def as_system(system: SystemPrompt | str | None) -> SystemPrompt:
    """A system prompt as given: a ``SystemPrompt`` (an adapter's, say), or text (blank: none given)."""
    return system if isinstance(system, SystemPrompt) else SystemPrompt.typed(system)


def chat_messages(prompt: str, history: Iterable | None = None, system: SystemPrompt | str | None = None,
                  template_default: str | None = None) -> list[dict]:
    """The full conversation for the template, with the system turn as training made it (an explicit
    system prompt replaces any carried in the history); refuses an empty prompt. ``template_default``:
    the system prompt the template adds where there is none."""
    require_text(prompt)
    messages = normalize_history(history) + [{"role": "user", "content": prompt}]
    return as_system(system).apply(messages, template_default)[0]


def require_text(prompt) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InferenceError("The prompt is empty: type a message first.")


def encode_messages(tokenizer, messages: list[dict]) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` (batch of 1) for a conversation, assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise InferenceError(
            "this model's tokenizer has no chat template, so it cannot chat; use raw completion "
            "(--raw in the CLI) or an instruct model."
        )
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise InferenceError("The prompt is empty: type a message first.")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def encode_raw(tokenizer, text: str) -> dict[str, torch.Tensor]:
    """Plain text completion: the text as the tokenizer encodes it (with its usual BOS, if any)."""
    require_text(text)
    encoded = tokenizer(text, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def encode_prompt(tokenizer, prompt: str, *, history: Iterable | None = None,
                  system: SystemPrompt | str | None = None, raw: bool = False) -> dict[str, torch.Tensor]:
    """One entry point for both modes; ``history`` and ``system`` apply to chat mode only."""
    if raw:
        if history or as_system(system).text is not None:
            raise InferenceError("raw completion takes only the text to continue: no history or system prompt.")
        return encode_raw(tokenizer, prompt)
    template = ChatTemplate(TOKENIZER_TEMPLATE, getattr(tokenizer, "chat_template", None) or "")
    default = template_system_prompt(tokenizer, template) if template.source else None
    return encode_messages(tokenizer, chat_messages(prompt, history, system, default))

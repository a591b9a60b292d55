"""Does an exported model see what training saw? The run's own conversations rendered with the template
used in training and with each exported one, tokenized, compared token by token.

The most common complaint after exporting a fine-tuned model is that it "talks nonsense": the runtime
renders prompts with another template, or another system prompt, than training did. This check runs on
every export and says which, and where.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_app.data import DataError, PromptFormat, load_split
from lora_app.data.templates import ChatTemplate, template_system_prompt

CHECKED_CONVERSATIONS = 5
# stand-ins when the run's data is gone: one with a system turn, one without, one with two turns
FALLBACK_CONVERSATIONS = (
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Tell me a joke."}],
)


@dataclass(frozen=True)
class TemplateCheck:
    """The outcome for one exported template: ``difference`` is None when every prompt was identical."""

    target: str  # "GGUF chat template", "Ollama Modelfile"
    conversations: int
    difference: str | None = None

    @property
    def identical(self) -> bool:
        return self.difference is None

    def line(self) -> str:
        if self.identical:
            return f"{self.target}: identical to training on {self.conversations} conversations."
        return f"{self.target}: DIFFERS from training — {self.difference}"


def run_conversations(adapter_folder: str | os.PathLike | None) -> list[list[dict]]:
    """A few conversations from the data the adapter was trained on (read through its run's
    ``config.json``), else ``FALLBACK_CONVERSATIONS``."""
    try:
        settings = json.loads((Path(adapter_folder) / ".." / "config.json").read_text())
        _, train, _ = load_split(settings["data"], format=settings.get("data_format"),
                                 mapping=settings.get("data_mapping"), limit=CHECKED_CONVERSATIONS)
    except (OSError, ValueError, KeyError, TypeError, DataError):
        return list(FALLBACK_CONVERSATIONS)
    conversations = [list(sample.messages) for sample in train if sample.messages]
    return conversations or list(FALLBACK_CONVERSATIONS)


def check(name: str, render: Callable[[list[dict]], str], trained: PromptFormat, tokenizer,
          conversations) -> TemplateCheck:
    """Compare ``render(messages)`` (the exported runtime's prompt before a reply) with training's.

    A run that set its own system prompt replaced the data's; at run time a user's own system prompt
    wins, as it should, so such conversations are checked without theirs (the runtime then has to
    supply the run's)."""
    default = template_system_prompt(tokenizer, ChatTemplate(trained.template, trained.chat_template))
    checked = 0
    for number, messages in enumerate(conversations, 1):
        if trained.system.text is not None:
            messages = [m for m in messages if m["role"] != "system"]
        history = _before_last_reply(list(messages))
        if not history:
            continue
        checked += 1
        seen, _ = trained.system.apply(history, default)
        want = tokenizer.apply_chat_template(seen, chat_template=trained.chat_template, tokenize=False,
                                             add_generation_prompt=True)
        want_ids = tokenizer(want, add_special_tokens=False)["input_ids"]
        got_ids = tokenizer(render(history), add_special_tokens=False)["input_ids"]
        if want_ids != got_ids:
            return TemplateCheck(name, checked, _first_difference(tokenizer, number, want_ids, got_ids))
    return TemplateCheck(name, checked)


def _before_last_reply(messages: list[dict]) -> list[dict]:
    """The conversation up to its last user turn: what a runtime renders before generating."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    return messages[: last_user + 1] if last_user is not None else []


def _first_difference(tokenizer, number: int, want: list[int], got: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))

    def shown(ids):
        return repr(tokenizer.decode(ids[max(at - 8, 0): at + 8]))

    return (f"conversation {number}, token {at}: training saw …{shown(want)}…, the export gives "
            f"…{shown(got)}…")

"""One chat reply from a model you already hold — the simplest entry point, kept for app.py.

For adapters, modes, streaming to a UI and several sessions at once use ``InferenceEngine``; this
function is for code that has a ``(model, tokenizer)`` pair and wants one answer.
"""

from __future__ import annotations

from lora_app.inference.prompts import encode_messages, eos_token_ids, normalize_history
from lora_app.inference.settings import GenerationSettings
from lora_app.inference.streaming import GenerationStream


def chat_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> str:
    """The assistant's next turn after ``messages`` (``[{"role": ..., "content": ...}]``).
    Greedy when ``temperature`` is 0; stops at the tokenizer's EOS. An empty prompt raises
    ``InferenceError`` (a ValueError)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    messages = normalize_history(messages)
    encode_messages(tokenizer, messages)  # refuse an empty prompt before starting a thread

    def prepare():
        return encode_messages(tokenizer, messages)

    return GenerationStream(model, tokenizer, prepare, settings, eos_token_ids(model, tokenizer)).text()

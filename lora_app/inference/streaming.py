"""Streaming generation: text pieces as they are decoded, then the figures of the whole run.

The tokens come from ``decode.TokenLoop`` in the caller's own thread, one per ``next()``: no worker
thread, no queue. Text is cut into pieces the way transformers' ``TextStreamer`` does (whole words,
a line at a time), so a piece never ends in half a character. The stream can be abandoned at any
time (a closed browser tab): closing it stops the loop, so the model is free again at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import TextStreamer

from lora_app.inference.decode import TokenLoop
from lora_app.inference.settings import GenerationSettings


@dataclass(frozen=True)
class Generation:
    """One finished generation. ``text`` is the reply without special tokens, stripped;
    ``new_tokens`` counts every generated token (the final EOS included); ``seconds`` is the time
    spent computing (the prompt's pass included; the caller's time between pieces not) and
    ``tokens_per_s`` = new_tokens / seconds.
    ``finish_reason`` is "eos", "length" or "cancelled"; ``mode`` the label of the mode that ran."""

    text: str
    new_tokens: int
    prompt_tokens: int
    seconds: float
    tokens_per_s: float
    finish_reason: str
    mode: str = ""


class _Pieces(TextStreamer):
    """``TextStreamer``'s word-at-a-time cutting, collected into a list instead of printed."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.ready: list[str] = []
        self.taken: list[str] = []  # every piece handed out so far

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.ready.append(text)

    def take(self) -> list[str]:
        ready, self.ready = self.ready, []
        self.taken += ready
        return ready


class GenerationStream:
    """Iterate to get text pieces; afterwards ``result`` holds the ``Generation``.

    ``before`` runs first, once the stream is iterated (the engine takes its lock and switches the
    mode there) and returns the mode's label; ``after`` runs last, however the iteration ends, even
    when ``before`` itself failed (the engine releases its lock there). Nothing
    happens until the first ``next()``, so a stream that is created and dropped holds nothing.
    """

    def __init__(self, model, tokenizer, prepare: Callable[[], dict], settings: GenerationSettings,
                 eos_token_id: list[int], *, before: Callable[[], str] | None = None,
                 after: Callable[[], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.prepare, self.settings, self.eos_token_id = prepare, settings, eos_token_id
        self.before, self.after = before, after
        self.result: Generation | None = None
        self._cancel = threading.Event()
        self._iterator: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    def __next__(self) -> str:
        return next(iter(self))

    def cancel(self) -> None:
        """Stop after the current token; the pieces so far stay, ``finish_reason`` is "cancelled"."""
        self._cancel.set()

    def close(self) -> None:
        self.cancel()
        if self._iterator is not None:
            self._iterator.close()

    def text(self) -> str:
        """Run to the end and return the reply (the streaming pieces are joined)."""
        for _ in self:
            pass
        return self.result.text

    def finish(self) -> Generation:
        self.text()
        return self.result

    def _run(self) -> Iterator[str]:
        try:
            label = self.before() if self.before else ""
            input_ids = self.prepare()["input_ids"].to(self.model.device)
            loop = TokenLoop(self.model, self.settings, self.eos_token_id, self._cancel)
            cutter, new_ids = _Pieces(self.tokenizer), []
            for token in loop.run(input_ids):
                new_ids.append(token)
                cutter.put(torch.tensor([token]))
                yield from cutter.take()
            cutter.end()
            yield from cutter.take()
            if self._cancel.is_set():
                reason = "cancelled"
            elif new_ids and new_ids[-1] in self.eos_token_id:
                reason = "eos"
            else:
                reason = "length"
            seconds = loop.seconds
            self.result = Generation(
                text="".join(cutter.taken).strip(), new_tokens=len(new_ids), prompt_tokens=input_ids.shape[1],
                seconds=seconds, tokens_per_s=len(new_ids) / seconds if seconds > 0 else 0.0,
                finish_reason=reason, mode=label)
        finally:
            self._cancel.set()
            if self.after:
                self.after()

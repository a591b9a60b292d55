"""Streaming generation: text pieces as they are decoded, then the figures of the whole run.

``model.generate`` runs in a worker thread feeding a ``TextIteratorStreamer``; the caller iterates
the pieces. Why a thread and not a hand-written loop: transformers' sampler already does top-p,
top-k, repetition penalty, the KV cache and multiple EOS ids exactly, and the same code then serves
every architecture. The stream can be abandoned at any time (a closed browser tab): closing it sets
a stopping flag the worker checks after each token, so the model is free again within one token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import StoppingCriteriaList, TextIteratorStreamer

from lora_app.inference.settings import GenerationSettings


@dataclass(frozen=True)
class Generation:
    """One finished generation. ``text`` is the reply without special tokens, stripped;
    ``new_tokens`` counts every generated token (the final EOS included); ``seconds`` is the wall
    time of ``generate`` (prompt processing included) and ``tokens_per_s`` = new_tokens / seconds.
    ``finish_reason`` is "eos", "length" or "cancelled"; ``mode`` the label of the mode that ran."""

    text: str
    new_tokens: int
    prompt_tokens: int
    seconds: float
    tokens_per_s: float
    finish_reason: str
    mode: str = ""


class _Stop:
    """A stopping criterion that ends generation once ``event`` is set (transformers calls it with
    the ids so far after every step)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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
        label, worker = "", None
        try:
            label = self.before() if self.before else ""
            inputs = {k: v.to(self.model.device) for k, v in self.prepare().items()}
            prompt_len = inputs["input_ids"].shape[1]
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            config = self.settings.generation_config(self.eos_token_id, self.tokenizer.pad_token_id)
            outcome: dict = {}

            def work():
                try:
                    with torch.random.fork_rng(devices=_cuda_devices(self.model)):
                        if self.settings.seed is not None:
                            torch.manual_seed(self.settings.seed)
                        start = time.perf_counter()
                        outcome["ids"] = self.model.generate(
                            **inputs, generation_config=config, streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([_Stop(self._cancel)]))
                        outcome["seconds"] = time.perf_counter() - start
                except BaseException as err:  # handed to the caller's thread below
                    outcome["error"] = err
                    streamer.end()  # generate died before ending the stream: unblock the reader

            worker = threading.Thread(target=work, name="lora-app-generate", daemon=True)
            worker.start()
            pieces = []
            for piece in streamer:
                if piece:
                    pieces.append(piece)
                    yield piece
            worker.join()
            if "error" in outcome:
                raise outcome["error"]
            new_ids = outcome["ids"][0, prompt_len:]
            seconds = outcome["seconds"]
            if self._cancel.is_set():
                reason = "cancelled"
            elif len(new_ids) and int(new_ids[-1]) in self.eos_token_id:
                reason = "eos"
            else:
                reason = "length"
            self.result = Generation(
                text="".join(pieces).strip(), new_tokens=len(new_ids), prompt_tokens=prompt_len,
                seconds=seconds, tokens_per_s=len(new_ids) / seconds if seconds > 0 else 0.0,
                finish_reason=reason, mode=label)
        finally:
            self._cancel.set()
            if worker is not None:
                worker.join()
            if self.after:
                self.after()


def _cuda_devices(model) -> list[int]:
    device = getattr(model, "device", torch.device("cpu"))
    return [device.index or 0] if device.type == "cuda" else []

"""Sampling settings for one generation, validated before anything runs.

Kept apart from the generation code so the UI, the CLI and the benchmark share one definition of the
defaults and of what is allowed, and so every problem is reported at once rather than one per try.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from transformers import GenerationConfig

from lora_app.errors import InferenceError


@dataclass(frozen=True)
class GenerationSettings:
    """How to pick the next tokens.

    ``temperature`` 0 means greedy decoding (deterministic, top-p/top-k ignored); above 0 the next
    token is sampled with ``top_p`` (1 = off) and ``top_k`` (0 = off). ``repetition_penalty`` 1 is
    off. ``seed`` makes sampling repeatable (None: a fresh random draw each time). Generation stops
    at the tokenizer's end-of-sequence token or after ``max_new_tokens``; ``min_new_tokens`` holds
    the end token back until that many tokens exist (benchmarks use it for equal-length runs).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = 0
    min_new_tokens: int = 0

    def __post_init__(self):
        problems = []

        def whole(value, low):
            return not isinstance(value, bool) and isinstance(value, int) and value >= low

        def number(value):
            return not isinstance(value, bool) and isinstance(value, (int, float))

        if not whole(self.max_new_tokens, 1):
            problems.append(f"max new tokens must be a whole number >= 1 (got {self.max_new_tokens!r})")
        if not (number(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be >= 0 (got {self.temperature!r})")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            problems.append(f"top-p must be in (0, 1] (got {self.top_p!r})")
        if not whole(self.top_k, 0):
            problems.append(f"top-k must be a whole number >= 0 (got {self.top_k!r})")
        if not (number(self.repetition_penalty) and self.repetition_penalty > 0):
            problems.append(f"repetition penalty must be > 0 (got {self.repetition_penalty!r})")
        if self.seed is not None and not whole(self.seed, 0):
            problems.append(f"seed must be a whole number >= 0 or empty (got {self.seed!r})")
        if not whole(self.min_new_tokens, 0):
            problems.append(f"min new tokens must be a whole number >= 0 (got {self.min_new_tokens!r})")
        if problems:
            raise InferenceError("Invalid generation settings: " + "; ".join(problems) + ".")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> "GenerationSettings":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def generation_config(self, eos_token_id, pad_token_id):
        """A fresh transformers ``GenerationConfig``: the model's own sampling defaults (some hub models
        ship temperature 0.6 ...) must not leak into a request that asked for greedy decoding."""
        sampling = {}
        if not self.greedy:
            sampling = dict(temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k))
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens or None,
            do_sample=not self.greedy,
            repetition_penalty=float(self.repetition_penalty),
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **sampling,
        )

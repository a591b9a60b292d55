"""Learning-rate schedules: the multiplier of the peak learning rate at each optimizer step.

The same curves as transformers' ``get_scheduler`` (linear, cosine, ... after a linear warmup), written
here because importing that function pulls in transformers' Trainer utilities (and through them peft
and bitsandbytes when installed): seconds of start-up and memory a training process does not use.
Pure math, no torch: the settings read the names from here.
"""

from __future__ import annotations

import math

POLYNOMIAL_END = 1e-7  # where "polynomial" ends, as a fraction of the peak (transformers: 1e-7 absolute)


def linear(progress: float) -> float:
    return max(0.0, 1.0 - progress)


def cosine(progress: float) -> float:
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def constant(progress: float) -> float:
    return 1.0


def cosine_with_restarts(progress: float) -> float:
    """One hard restart: cosine down to 0 once (transformers' default of one cycle)."""
    return 0.0 if progress >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))


def polynomial(progress: float) -> float:
    """Linear decay (power 1) to ``POLYNOMIAL_END``."""
    return POLYNOMIAL_END if progress >= 1.0 else (1.0 - POLYNOMIAL_END) * (1.0 - progress) + POLYNOMIAL_END


SCHEDULES = {"linear": linear, "cosine": cosine, "constant": constant, "constant_with_warmup": constant,
             "cosine_with_restarts": cosine_with_restarts, "polynomial": polynomial}


def multiplier(name: str, step: int, warmup: int, total: int) -> float:
    """The learning rate at ``step`` as a fraction of the peak: a linear warmup over ``warmup`` steps
    (none for "constant"), then schedule ``name`` over the remaining steps up to ``total``."""
    if step < warmup and name != "constant":
        return step / max(1, warmup)
    return SCHEDULES[name]((step - warmup) / max(1, total - warmup))

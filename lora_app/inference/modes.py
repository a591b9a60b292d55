"""What the base model runs as: base, one adapter, a weighted mix, or merged.

A ``Mode`` is a small immutable value, so a UI session can keep its own and pass it with each request:
the engine switches to it (a pointer change: which adapters each LoRA layer adds) before it
generates, and two sessions chatting with different adapters on one base never see each other's
choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_app.errors import InferenceError


@dataclass(frozen=True)
class Mode:
    """``weights``: the active adapters and their mixing weights (empty: the base model alone);
    ``merged``: those adapters folded into the base weights (no extra latency per token)."""

    weights: tuple[tuple[str, float], ...] = ()
    merged: bool = False

    def __post_init__(self):
        names = [name for name, _ in self.weights]
        if len(set(names)) != len(names):
            raise InferenceError(f"an adapter appears twice in the mix: {', '.join(names)}.")
        if self.merged and not self.weights:
            raise InferenceError("merged mode needs at least one adapter to merge.")

    @classmethod
    def base(cls) -> "Mode":
        return cls()

    @classmethod
    def adapter(cls, name: str) -> "Mode":
        return cls(((name, 1.0),))

    @classmethod
    def mix(cls, weights: dict[str, float] | list[str]) -> "Mode":
        """``{"a": 0.7, "b": 0.3}``, or a list of names (weight 1 each, as in the LoRA core)."""
        items = weights.items() if isinstance(weights, dict) else ((n, 1.0) for n in weights)
        return cls(tuple((str(n), _weight(w)) for n, w in items))

    @classmethod
    def merged_of(cls, adapters: str | list[str] | dict[str, float]) -> "Mode":
        """The given adapter or mix, merged into the base weights."""
        inner = cls.adapter(adapters) if isinstance(adapters, str) else cls.mix(adapters)
        return cls(inner.weights, merged=True)

    @classmethod
    def of(cls, value: "Mode | str | list[str] | dict[str, float] | None", merged: bool = False) -> "Mode":
        """Whatever a caller has: a Mode, None/"" (base), a name, a list or a dict of weights."""
        if isinstance(value, Mode):
            return cls(value.weights, merged=True) if merged and not value.merged else value
        if not value:
            mode = cls.base()
        elif isinstance(value, str):
            mode = cls.adapter(value)
        else:
            mode = cls.mix(value)
        return cls(mode.weights, merged=True) if merged else mode

    @property
    def adapters(self) -> dict[str, float]:
        return dict(self.weights)

    @property
    def kind(self) -> str:
        """"base", "adapter", "mix" or "merged"."""
        if self.merged:
            return "merged"
        if not self.weights:
            return "base"
        return "adapter" if len(self.weights) == 1 and self.weights[0][1] == 1.0 else "mix"

    @property
    def label(self) -> str:
        """Short text for a column header or a log line: base, name, mix(a=0.7, b=0.3), merged(...)."""
        if not self.weights:
            return "base"
        if len(self.weights) == 1 and self.weights[0][1] == 1.0:
            inner = self.weights[0][0]
        else:
            inner = ", ".join(f"{n}={w:g}" for n, w in self.weights)
            inner = inner if self.merged else f"mix({inner})"
        return f"merged({inner})" if self.merged else inner


def _weight(value) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise InferenceError(f"a mixing weight must be a number (got {value!r}).") from None
    if weight != weight or weight in (float("inf"), float("-inf")):
        raise InferenceError(f"a mixing weight must be finite (got {value!r}).")
    return weight

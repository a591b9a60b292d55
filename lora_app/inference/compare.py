"""Side by side: one prompt and one seed through the base and several adapters (and a mix).

What varies between the columns is the adapter and nothing else: the same prompt tokens, the same
sampling settings and the same seed, so with temperature 0 — or any temperature and a fixed seed —
a difference between two columns is the adapter's doing.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_app.errors import InferenceError
from lora_app.inference.modes import Mode
from lora_app.inference.streaming import Generation


@dataclass(frozen=True)
class ComparisonResult:
    """One column: ``label`` (e.g. "base", "my-run", "mix(a=0.5, b=0.5)"), the ``mode`` that ran
    and its ``generation`` (text, tokens, tokens/s)."""

    label: str
    mode: Mode
    generation: Generation

    @property
    def text(self) -> str:
        return self.generation.text

    @property
    def tokens_per_s(self) -> float:
        return self.generation.tokens_per_s


def comparison_modes(adapters: list[str] | tuple[str, ...] = (), mix: dict[str, float] | None = None,
                     include_base: bool = True, merged: bool = False) -> list[Mode]:
    """The columns, in order: base, each adapter, then the mix. ``merged`` runs the adapter columns
    merged (the same outputs, at base speed)."""
    modes = [Mode.base()] if include_base else []
    modes += [Mode.of(name, merged=merged) for name in adapters]
    if mix:
        modes.append(Mode.of(dict(mix), merged=merged))
    if not modes:
        raise InferenceError("nothing to compare: choose the base model and/or at least one adapter.")
    if len(set(modes)) != len(modes):
        raise InferenceError("the same model appears twice in the comparison.")
    return modes

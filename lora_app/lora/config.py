"""The settings of one adapter, validated before anything is built."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lora_app.errors import LoraConfigError

VARIANTS = ("lora", "rslora", "dora", "lora-fa", "vera", "delta-lora")
QUANTIZATIONS = ("none", "8bit", "4bit")  # how the base under an adapter may be stored (4bit: QLoRA)


@dataclass
class LoraConfig:
    """What to adapt and how.

    ``targets``: None (the architecture's defaults), ``"all-linear"`` (every linear layer except the
    output head), a regex matched against full module paths, or a list of names matched as path
    suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).

    ``variant``:
      lora        y = W0 x + s B A dropout(x),  s = alpha / rank
      rslora      the same with s = alpha / sqrt(rank)  (rank-stabilised)
      dora        W' = m * (W0 + sBA) / ||W0 + sBA||  per output row, norm detached
      lora-fa     plain LoRA with A frozen after init (only B trains)
      vera        y = W0 x + lambda_b * (B (lambda_d * (A x))), A, B frozen and shared, from ``vera_seed``
      delta-lora  plain LoRA whose optimizer steps also move W0 by ``delta_lambda`` * Delta(sBA)
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] | None = None
    variant: str = "lora"
    delta_lambda: float = 0.5
    vera_seed: int = 0
    vera_d_initial: float = 0.1
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        problems = {}
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            problems["rank"] = f"rank must be a whole number > 0 (got {self.rank!r})"
        if not _number(self.alpha) or not self.alpha > 0:
            problems["alpha"] = f"alpha must be > 0 (got {self.alpha!r})"
        if not _number(self.dropout) or not 0 <= self.dropout < 1:
            problems["dropout"] = f"dropout must be in [0, 1) (got {self.dropout!r})"
        if self.variant not in VARIANTS:
            problems["variant"] = f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}"
        if self.variant == "delta-lora" and not (_number(self.delta_lambda) and self.delta_lambda >= 0):
            problems["delta_lambda"] = f"delta_lambda must be >= 0 (got {self.delta_lambda!r})"
        if isinstance(self.targets, (list, tuple)) and not self.targets:
            problems["targets"] = "targets is an empty list; give module names, a regex or 'all-linear'"
        if problems:
            raise LoraConfigError(problems)

    @property
    def scaling(self) -> float:
        """The factor s in front of BA: alpha / rank, or alpha / sqrt(rank) for rsLoRA; VeRA has none."""
        if self.variant == "vera":
            return 1.0
        if self.variant == "rslora":
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

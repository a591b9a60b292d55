"""A training run's settings: one dataclass for the CLI flags, the config file and the UI.

Everything is checked before a model or a dataset is loaded, and every problem is reported at once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from lora_app.lora.config import VARIANTS

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "8bit", "4bit")


@dataclass
class TrainConfig:
    model: str = "default"
    data: str | None = None
    output: str | None = None
    val_data: str | None = None
    data_format: str | None = None
    data_mapping: dict | None = None  # format field -> column name, to map columns by hand
    template: str | None = None
    train_on_prompt: bool = False
    # LoRA
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str | None = None  # comma list, regex, "all-linear"; None = architecture default
    variant: str = "lora"
    lora_plus_ratio: float | None = None
    delta_lambda: float = 0.5
    quantization: str = "none"
    double_quant: bool = True
    # optimisation
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_batch_tokens: int | None = None  # cap on padded tokens per micro-batch; None = auto, 0 = no cap
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup: float = 0.03  # < 1: fraction of steps; >= 1: a number of steps
    max_grad_norm: float = 1.0
    seq_len: int = 512
    packing: bool = False
    val_fraction: float = 0.0
    eval_every: int = 0  # steps; 0 = at the end only (when there is validation data)
    save_every: int = 0  # steps; 0 = only the final adapter (and a checkpoint when cancelled)
    log_every: int = 1
    seed: int = 42
    precision: str = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    resume: bool = False

    def problems(self) -> list[str]:
        """Everything wrong with these settings, in plain words (empty when all is well)."""
        p = []

        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                p.append(f"{name} must be a whole number > 0 (got {value!r})")

        if not self.data:
            p.append("no training data given (--data)")
        if self.data_mapping is not None and (not isinstance(self.data_mapping, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.data_mapping.items())):
            p.append(f"the column mapping must map field names to column names (got {self.data_mapping!r})")
        if not self.output:
            p.append("no output folder given (--output)")
        positive_int("rank", self.rank)
        positive_int("batch size", self.batch_size)
        positive_int("gradient accumulation", self.grad_accum)
        positive_int("sequence length", self.seq_len)
        positive_int("log-every", self.log_every)
        if not _number(self.alpha) or self.alpha <= 0:
            p.append(f"alpha must be > 0 (got {self.alpha!r})")
        if not _number(self.dropout) or not 0 <= self.dropout < 1:
            p.append(f"dropout must be in [0, 1) (got {self.dropout!r})")
        if not _number(self.lr) or self.lr <= 0:
            p.append(f"learning rate must be > 0 (got {self.lr!r})")
        if self.variant not in VARIANTS:
            p.append(f"unknown variant {self.variant!r} (choose from {', '.join(VARIANTS)})")
        if self.lora_plus_ratio is not None and (not _number(self.lora_plus_ratio) or self.lora_plus_ratio <= 0):
            p.append(f"LoRA+ ratio must be > 0 (got {self.lora_plus_ratio!r})")
        if self.quantization not in QUANTIZATIONS:
            p.append(f"unknown quantization {self.quantization!r} (choose from {', '.join(QUANTIZATIONS)})")
        if self.variant == "delta-lora" and self.quantization != "none":
            p.append("delta-lora updates the base weights, so it needs quantization 'none'")
        if self.scheduler not in SCHEDULERS:
            p.append(f"unknown scheduler {self.scheduler!r} (choose from {', '.join(SCHEDULERS)})")
        if self.precision not in PRECISIONS:
            p.append(f"unknown precision {self.precision!r} (choose from {', '.join(PRECISIONS)})")
        if self.max_steps is None and (not _number(self.epochs) or self.epochs <= 0):
            p.append(f"epochs must be > 0 (got {self.epochs!r})")
        if self.max_steps is not None:
            positive_int("max steps", self.max_steps)
        if not _number(self.warmup) or self.warmup < 0:
            p.append(f"warmup must be >= 0 (got {self.warmup!r})")
        if not _number(self.val_fraction) or not 0 <= self.val_fraction < 1:
            p.append(f"validation fraction must be in [0, 1) (got {self.val_fraction!r})")
        for name in ("eval_every", "save_every", "max_batch_tokens"):
            value = getattr(self, name)
            if value is None and name == "max_batch_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                p.append(f"{name.replace('_', '-')} must be a whole number >= 0 (got {value!r})")
        if not _number(self.max_grad_norm) or self.max_grad_norm < 0:
            p.append(f"max grad norm must be >= 0 (got {self.max_grad_norm!r})")
        return p

    def validate(self) -> "TrainConfig":
        problems = self.problems()
        if problems:
            raise TrainConfigError("Cannot start training:\n- " + "\n- ".join(problems))
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in values if k.replace("-", "_") not in names)
        if unknown:
            raise TrainConfigError(f"Unknown setting(s) in the config: {', '.join(unknown)}.")
        return cls(**{k.replace("-", "_"): v for k, v in values.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """Read a YAML or JSON config file (the same keys as the CLI flags)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise TrainConfigError(f"Cannot read the config file {path}: {err.strerror}.") from err
        try:
            if path.suffix.lower() == ".json":
                values = json.loads(text)
            else:
                import yaml

                values = yaml.safe_load(text)
        except Exception as err:  # json and yaml raise different types; both mean "not parseable"
            raise TrainConfigError(f"The config file {path} is not valid {path.suffix[1:].upper() or 'YAML'}: {err}") from err
        if not isinstance(values, dict):
            raise TrainConfigError(f"The config file {path} must hold a mapping of settings.")
        return cls.from_dict(values)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""The training settings form: which TrainConfig fields the page edits, and the conversions between
widget values and a :class:`TrainConfig` (both directions, so saved configs load back into the form).

Widgets hold what people can type (0 for "off", a checkbox list of module names); TrainConfig holds
what the trainer wants (None, a comma list). Nothing here touches Gradio, so it is unit-tested plainly.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import fields

from lora_app.training.config import TrainConfig

# TrainConfig fields edited on the page, in the order the callbacks receive them. "targets" is two
# widgets (module checkboxes + an all-linear switch), hence the extra pseudo-field "all_linear".
FIELDS = (
    "model", "quantization", "variant", "rank", "alpha", "dropout", "targets", "all_linear", "lora_plus_ratio",
    "epochs", "max_steps", "batch_size", "grad_accum", "lr", "scheduler", "warmup", "seq_len", "packing",
    "val_fraction", "eval_every", "save_every", "seed", "precision", "gradient_checkpointing",
    "data_format", "template", "train_on_prompt", "data_mapping",
)

# Defaults of the page where they differ from the CLI's: a first run on a laptop CPU with the default
# model and the demo dataset should show its effect within a few minutes.
UI_DEFAULTS = dict(rank=16, alpha=32.0, lr=1e-3, max_steps=60, batch_size=4, seq_len=256, warmup=0.05,
                   eval_every=20, val_fraction=0.05, log_every=1, save_every=0)

_INTS = {"rank", "max_steps", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "seed"}
_OPTIONAL = {"max_steps", "lora_plus_ratio"}  # 0 on the page means "not set"
_AUTO = {"data_format", "template"}           # "auto" on the page means None


def start_model() -> str:
    """The model the page starts with: ``LORA_APP_MODEL`` (e.g. a Hub id on a GPU Space), else the
    embedded default."""
    return os.environ.get("LORA_APP_MODEL") or "default"


def default_config() -> TrainConfig:
    return TrainConfig(**UI_DEFAULTS, model=start_model())


def form_values(config: TrainConfig) -> dict:
    """Widget values for ``config`` (the inverse of :func:`config_from_values`)."""
    values = {}
    for name in FIELDS:
        if name == "all_linear":
            values[name] = config.targets == "all-linear"
        elif name == "targets":
            t = config.targets
            values[name] = [] if t in (None, "all-linear") else [s.strip() for s in str(t).split(",") if s.strip()]
        elif name == "data_mapping":  # a text box: "field=column, ..."
            mapping = getattr(config, name, None) or {}
            values[name] = ", ".join(f"{k}={v}" for k, v in mapping.items())
        elif name in _OPTIONAL:
            values[name] = getattr(config, name) or 0
        elif name in _AUTO:
            values[name] = getattr(config, name) or "auto"
        else:
            values[name] = getattr(config, name)
    return values


def config_from_values(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from widget values (missing ones keep ``base``'s, by default the page defaults).

    No validation here: ``TrainConfig.problems()`` lists everything wrong at once, in plain words.
    """
    config = TrainConfig(**(base or default_config()).to_dict())
    for name, value in values.items():
        if name == "all_linear" or name not in {f.name for f in fields(TrainConfig)}:
            continue
        if name == "targets":
            value = _targets(value, values.get("all_linear", False))
        elif name == "data_mapping":
            from lora_app.ui.data_tab import parse_mapping

            value = parse_mapping(value)
        elif name in _INTS and isinstance(value, float) and value.is_integer():
            value = int(value)  # gr.Number hands back floats
        if name in _OPTIONAL and not value:
            value = None
        if name in _AUTO and value in (None, "", "auto"):
            value = None
        if name == "model":
            value = (value or "default").strip()
        setattr(config, name, value)
    return config


def _targets(selected, all_linear: bool) -> str | None:
    if all_linear:
        return "all-linear"
    if isinstance(selected, str):
        return selected or None
    return ",".join(selected) if selected else None  # nothing ticked: the architecture's defaults


def cli_command(config: TrainConfig) -> str:
    """The shell command that runs the same training as the page (only settings that differ from the
    CLI's defaults are spelled out)."""
    defaults = TrainConfig()
    parts = ["python -m lora_app train"]
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if f.name in ("resume",) or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else ("--no-double-quant" if f.name == "double_quant" else ""))
        elif value is not None:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " \\\n    ".join(p for p in parts if p)

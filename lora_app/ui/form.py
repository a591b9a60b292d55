"""The training settings on the page, derived from TrainConfig's declarations: which settings the
page edits, the widget for each (label, help, choices, bounds), and the conversions between widget
values and a :class:`TrainConfig` (both directions, so saved configs load back into the form).

Widgets hold what people can type (0 for "unset", "auto" for an unset choice, a checkbox list of
module names); TrainConfig holds what the trainer wants (None, a comma list).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import fields

import gradio as gr

from lora_app.data import parse_mapping
from lora_app.model_source import DEFAULT_MODEL, DEFAULT_MODEL_ID, embedded_available
from lora_app.training.config import TrainConfig, flag, label, optional, value_type

SETTINGS = {f.name: f for f in fields(TrainConfig)}
# What the page does not edit: the dataset comes from the Data tab and the run folder from the store;
# the rest are for the command line (remote code, and the CPU's token budget and lanes, tuned for the machine).
OFF_PAGE = {"data", "val_data", "output", "resume", "trust_remote_code", "max_batch_tokens", "cpu_lanes"}
# Settings edited on the page, in the order the callbacks receive them. "targets" is two widgets (module
# checkboxes + an all-linear switch), hence the extra pseudo-field "all_linear".
FIELDS = (*(name for name in SETTINGS if name not in OFF_PAGE), "all_linear")

# Defaults of the page where they differ from the CLI's: a first run on a laptop CPU with the default
# model and the demo dataset should show its effect within a few minutes.
UI_DEFAULTS = dict(rank=16, alpha=32.0, lr=1e-3, max_steps=60, batch_size=4, seq_len=256, warmup=0.05,
                   eval_every=20, val_fraction=0.05, log_every=1, save_every=0)
AUTO = "auto"  # an unset choice on the page


def _unset_number(name: str) -> bool:
    """A number setting that may be unset: 0 on the page."""
    f = SETTINGS[name]
    return optional(f) and value_type(f) in (int, float)


def _unset_text(name: str) -> bool:
    """A text setting that may be unset: blank on the page."""
    f = SETTINGS[name]
    return optional(f) and value_type(f) is str and f.metadata["choices"] is None and name != "model"


def _unset_choice(name: str) -> bool:
    """A choice that may be unset: "auto" on the page."""
    f = SETTINGS[name]
    return optional(f) and f.metadata["choices"] is not None


def start_model() -> str:
    """The model the page starts with: ``LORA_APP_MODEL`` (e.g. a Hub id on a GPU Space), else the
    embedded default, else -- where its package is not installed, as on a Space -- the same model
    from the Hub."""
    return os.environ.get("LORA_APP_MODEL") or (DEFAULT_MODEL if embedded_available() else DEFAULT_MODEL_ID)


def default_config() -> TrainConfig:
    return TrainConfig(**UI_DEFAULTS, model=start_model())


def form_values(config: TrainConfig) -> dict:
    """Widget values for ``config`` (the inverse of :func:`config_from_values`)."""
    values = {}
    for name in FIELDS:
        if name == "all_linear":
            values[name] = config.targets == "all-linear"
            continue
        value = getattr(config, name)
        if name == "targets":
            value = [] if value in (None, "all-linear") else [s.strip() for s in str(value).split(",") if s.strip()]
        elif name == "data_mapping":  # a text box: "field=column, ..."
            value = ", ".join(f"{k}={v}" for k, v in (value or {}).items())
        elif value_type(SETTINGS[name]) is list:  # a text box: one item per line
            value = "\n".join(value or [])
        elif _unset_number(name):
            value = value or 0
        elif _unset_choice(name):
            value = value or AUTO
        elif _unset_text(name):
            value = value or ""
        values[name] = value
    return values


def config_from_values(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from widget values (missing ones keep ``base``'s, by default the page defaults).

    No validation here: ``TrainConfig.problems()`` lists everything wrong at once, in plain words.
    """
    config = TrainConfig(**(base or default_config()).to_dict())
    for name, value in values.items():
        if name not in SETTINGS:
            continue
        if name == "targets":
            value = _targets(value, values.get("all_linear", False))
        elif name == "data_mapping":
            value = parse_mapping(value)
        elif value_type(SETTINGS[name]) is list:
            value = [line.strip() for line in (value or "").splitlines() if line.strip()] or None
        elif name == "model":
            value = (value or DEFAULT_MODEL).strip()
        elif value_type(SETTINGS[name]) is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # gr.Number hands back floats
        if ((_unset_number(name) and not value) or (_unset_choice(name) and value in (None, "", AUTO))
                or (_unset_text(name) and not (value or "").strip())):
            value = None
        setattr(config, name, value)
    return config


def _targets(selected, all_linear: bool) -> str | None:
    if all_linear:
        return "all-linear"
    if isinstance(selected, str):
        return selected or None
    return ",".join(selected) if selected else None  # nothing ticked: the architecture's defaults


def widget(name: str, value, *, slider: tuple | None = None, **layout):
    """The Gradio component for setting ``name``, labelled and explained by its declaration.
    ``slider``: (minimum, maximum, step) to show a number as a slider."""
    f = SETTINGS[name]
    meta, kind = f.metadata, value_type(f)
    text = label(f)
    text = text[0].upper() + text[1:]
    if meta["unset"] and kind in (int, float):
        text += f" (0 = {meta['unset']})"
    info = meta["help"] + (f"; {AUTO}: {meta['unset']}" if meta["unset"] and meta["choices"] else "")
    if kind is bool:
        return gr.Checkbox(value=value, label=text, info=meta["help"], **layout)
    if meta["choices"] is not None:
        choices = ([AUTO] if optional(f) else []) + list(meta["choices"])
        return gr.Dropdown(choices, value=value, label=text, info=info, **layout)
    if kind is list:
        return gr.Textbox(value=value, label=text + " (one per line)", info=meta["help"].split(" (on the command")[0],
                          lines=3, **layout)
    if kind is str:
        placeholder = f"empty: {meta['unset']}" if meta["unset"] else None
        return gr.Textbox(value=value, label=text, info=meta["help"], placeholder=placeholder, **layout)
    if slider:
        lo, hi, step = slider
        return gr.Slider(lo, hi, value=value, step=step, label=text, info=meta["help"], **layout)
    # no minimum on the box: Gradio would refuse an out-of-range value with a bare "Error", while
    # TrainConfig.problems() says what is wrong in words
    return gr.Number(value=value, label=text, info=meta["help"], precision=0 if kind is int else None, **layout)


def cli_command(config: TrainConfig) -> str:
    """The shell command that runs the same training as the page (only settings that differ from the
    CLI's defaults are spelled out)."""
    defaults = TrainConfig()
    parts = ["python -m lora_app train"]
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if f.name == "resume" or value == getattr(defaults, f.name) or value is None:
            continue
        if isinstance(value, bool):
            parts.append(flag(f.name) if value else flag("no_" + f.name))
        elif isinstance(value, list):  # the flag takes a file: bash makes one of the lines
            parts.append(f"{flag(f.name)} <(printf '%s\\n' {' '.join(shlex.quote(item) for item in value)})")
        elif isinstance(value, dict):
            parts.append(f"{flag(f.name)} {shlex.quote(','.join(f'{k}={v}' for k, v in value.items()))}")
        else:
            parts.append(f"{flag(f.name)} {shlex.quote(str(value))}")
    return " \\\n    ".join(parts)

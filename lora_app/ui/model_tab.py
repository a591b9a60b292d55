"""Model & LoRA tab: the base model, the adapter and the hyperparameters, with a live estimate.

The target-module checkboxes list the chosen model's real layer names, read from a model built on
the meta device (no weights loaded, so switching models costs a second, not a download).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import gradio as gr

from lora_app.ui.common import UserError, fmt_bytes, fmt_count, friendly, model_config_for
from lora_app.ui.data_tab import dataset_label
from lora_app.ui.form import FIELDS, cli_command, config_from_values, default_config, form_values

MODEL_CHOICES = ["default"]


@functools.lru_cache(maxsize=4)
def meta_model(model: str):
    """The architecture without weights (meta device): layer names and parameter counts for free."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config_for(model))


@functools.lru_cache(maxsize=8)
def model_layers(model: str) -> tuple[list[str], list[str], str]:
    """(adaptable module names, the architecture's default targets, a one-line description)."""
    from lora_app.lora import DEFAULT_TARGETS, resolve_targets
    from lora_app.lora.targets import leaf_names

    config = model_config_for(model)
    meta = meta_model(model)
    names = leaf_names(resolve_targets(meta, "all-linear"))  # what all-linear adapts: no output head
    defaults = [n for n in DEFAULT_TARGETS.get(config.model_type, names) if n in names] or names
    params = sum(p.numel() for p in meta.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", "?")
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    shown = "the embedded SmolLM2-135M-Instruct" if model == "default" else f"`{model}`"
    about = (f"{shown}: {config.model_type}, {fmt_count(params)} parameters, {layers} layers"
             + (f", up to {limit} tokens" if limit else ""))
    return names, defaults, about


@friendly
def inspect_model(model):
    """(targets checkbox update, model description) for the model named in the picker."""
    model = (model or "default").strip()
    names, defaults, about = model_layers(model)
    return gr.update(choices=names, value=defaults), about


def alpha_ratio(rank, alpha, variant) -> str:
    try:
        rank, alpha = int(rank), float(alpha)
        if rank <= 0:
            raise ValueError
    except (TypeError, ValueError):
        return "scale: –"
    if variant == "rslora":
        return f"scale α/√r = {alpha / rank ** 0.5:.3g}"
    if variant == "vera":
        return "scale: learned per layer (VeRA)"
    return f"scale α/r = {alpha / rank:.3g}"


@functools.lru_cache(maxsize=64)
def _estimate(model: str, config_items: tuple) -> dict:
    from lora_app.lora import LoraConfig
    from lora_app.training.config import TrainConfig
    from lora_app.training.memory import estimate_memory

    config = TrainConfig(**dict(config_items))
    lora = LoraConfig(r=config.rank, alpha=config.alpha, dropout=config.dropout, targets=config.targets,
                      variant=config.variant, delta_lambda=config.delta_lambda)
    return estimate_memory(config, model_config_for(model), lora)


def estimate_text(config) -> str:
    """Trainable parameters and the memory estimate for ``config``, or what is wrong with it."""
    problems = [p for p in config.problems() if not p.startswith(("no training data", "no output folder"))]
    if problems:
        return "**Fix these settings:**\n" + "\n".join(f"- {p}" for p in problems)
    from lora_app.lora import resolve_targets

    resolve_targets(meta_model(config.model), config.targets)  # the estimate would guess; say what matches instead
    e = _estimate(config.model, tuple(sorted((k, v) for k, v in config.to_dict().items() if k not in ("data", "output"))))
    share = 100 * e["trainable_params"] / max(e["total_params"], 1)
    return (f"**{fmt_count(e['trainable_params'])} trainable parameters** ({share:.2f} % of {fmt_count(e['total_params'])}) · "
            f"estimated memory **{fmt_bytes(e['total_bytes'])}** (weights {fmt_bytes(e['weights_bytes'])}, "
            f"adapter + gradients + optimizer {fmt_bytes(e['adapter_bytes'] + e['gradients_bytes'] + e['optimizer_bytes'])}, "
            f"activations {fmt_bytes(e['activations_bytes'])}, runtime {fmt_bytes(e['runtime_bytes'])})")


@friendly
def summarize(data_path, *values):
    """(estimate markdown, CLI command, one-line run summary for the Train tab) for the form as it stands."""
    config = config_from_values(dict(zip(FIELDS, values)))
    config.data = data_path or "DATASET"
    try:
        estimate = estimate_text(config)
    except Exception as err:  # a layer name the model lacks, an unknown hub id: say so next to the form
        from lora_app.ui.common import explain

        estimate = f"**Cannot estimate:** {explain(err)}"
    return (estimate, f"```bash\n{cli_command(config)} \\\n    --output runs/my-run\n```",
            run_summary(config, data_path))


def run_summary(config, data_path) -> str:
    """What Start will train, in one line (settings live on the other tabs)."""
    data = f"**{dataset_label(data_path)}**" if data_path else "**no dataset yet** (Data tab)"
    length = f"{config.max_steps} steps" if config.max_steps else f"{config.epochs:g} epochs"
    return (f"Dataset {data} · model **{config.model}** · {config.variant} r={config.rank} α={config.alpha:g} · "
            f"{length} · batch {config.batch_size}×{config.grad_accum} · lr {config.lr:g} · seq {config.seq_len} "
            "— change these on the Data and Model & LoRA tabs.")


@friendly
def save_config(data_path, *values) -> str:
    """Write the form as a YAML file for download (the same keys as the CLI's --config)."""
    import yaml

    config = config_from_values(dict(zip(FIELDS, values)))
    config.data = data_path
    settings = {k: v for k, v in config.to_dict().items() if k not in ("output", "resume")}
    folder = Path(tempfile.mkdtemp(prefix="lora-config-"))
    path = folder / "lora_config.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return str(path)


@friendly
def load_config_file(path):
    """Form values from an uploaded YAML/JSON config: one update per field, plus a status line."""
    from lora_app.training.config import TrainConfig

    if not path:
        raise UserError("Choose a YAML or JSON config file first.")
    loaded = TrainConfig.from_file(path)
    config = default_config()
    for key, value in loaded.to_dict().items():
        if key in ("output", "resume", "data"):
            continue
        setattr(config, key, value)
    values = form_values(config)
    updates = []
    for name in FIELDS:
        if name == "targets" and values[name]:
            names, _, _ = model_layers(config.model)
            updates.append(gr.update(choices=sorted(set(names) | set(values[name])), value=values[name]))
        else:
            updates.append(values[name])
    return (*updates, f"Loaded settings from **{Path(path).name}**.")


def build(ui) -> None:
    d = form_values(default_config())
    f = ui.form
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                f["model"] = gr.Dropdown(MODEL_CHOICES, value=d["model"], allow_custom_value=True, label="Base model",
                                         info="default (embedded, offline), a Hub id such as Qwen/Qwen2.5-0.5B-Instruct, "
                                              "or a local folder", scale=3, elem_id="model-picker")
                f["quantization"] = gr.Radio(["none", "8bit", "4bit"], value=d["quantization"], label="Quantization",
                                             info="4bit = QLoRA", scale=2)
            ui.model_about = gr.Markdown(elem_id="model-about")
        with gr.Column(scale=2):
            ui.estimate = gr.Markdown(elem_id="estimate")
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Adapter")
            with gr.Row():
                f["variant"] = gr.Dropdown(["lora", "rslora", "dora", "lora-fa", "vera", "delta-lora"],
                                           value=d["variant"], label="Variant")
                f["rank"] = gr.Slider(1, 256, value=d["rank"], step=1, label="Rank r")
            with gr.Row():
                f["alpha"] = gr.Number(value=d["alpha"], label="Alpha α", minimum=0)
                ui.alpha_ratio = gr.Textbox(alpha_ratio(d["rank"], d["alpha"], d["variant"]), label="Scale",
                                            interactive=False)
            with gr.Row():
                f["dropout"] = gr.Slider(0, 0.5, value=d["dropout"], step=0.01, label="Dropout")
                f["lora_plus_ratio"] = gr.Number(value=d["lora_plus_ratio"], label="LoRA+ ratio (0 = off)", minimum=0,
                                                 info="B learns this many times faster than A; 16 is typical")
            f["all_linear"] = gr.Checkbox(value=d["all_linear"], label="All linear layers (all-linear)")
            f["targets"] = gr.CheckboxGroup([], value=d["targets"], label="Target modules",
                                            info="Nothing ticked = the architecture's defaults", elem_id="targets")
        with gr.Column():
            gr.Markdown("### Training")
            with gr.Row():
                f["max_steps"] = gr.Number(value=d["max_steps"], label="Max steps (0 = use epochs)", precision=0, minimum=0)
                f["epochs"] = gr.Number(value=d["epochs"], label="Epochs", minimum=0)
            with gr.Row():
                f["batch_size"] = gr.Number(value=d["batch_size"], label="Batch size", precision=0, minimum=1)
                f["grad_accum"] = gr.Number(value=d["grad_accum"], label="Gradient accumulation", precision=0, minimum=1)
            with gr.Row():
                f["lr"] = gr.Number(value=d["lr"], label="Learning rate")
                f["scheduler"] = gr.Dropdown(["linear", "cosine", "constant", "constant_with_warmup",
                                              "cosine_with_restarts", "polynomial"], value=d["scheduler"], label="Scheduler")
            with gr.Row():
                f["warmup"] = gr.Number(value=d["warmup"], label="Warmup (< 1: fraction, ≥ 1: steps)", minimum=0)
                f["seq_len"] = gr.Number(value=d["seq_len"], label="Sequence length", precision=0, minimum=2)
            with gr.Row():
                f["val_fraction"] = gr.Number(value=d["val_fraction"], label="Validation fraction", minimum=0, maximum=0.9)
                f["eval_every"] = gr.Number(value=d["eval_every"], label="Eval every (steps, 0 = end)", precision=0, minimum=0)
            with gr.Accordion("More", open=False):
                with gr.Row():
                    f["save_every"] = gr.Number(value=d["save_every"], label="Checkpoint every (steps, 0 = end)",
                                                precision=0, minimum=0)
                    f["seed"] = gr.Number(value=d["seed"], label="Seed", precision=0)
                with gr.Row():
                    f["precision"] = gr.Dropdown(["auto", "fp32", "bf16", "fp16"], value=d["precision"], label="Precision")
                    f["packing"] = gr.Checkbox(value=d["packing"], label="Pack short examples")
                    f["gradient_checkpointing"] = gr.Checkbox(value=d["gradient_checkpointing"],
                                                              label="Gradient checkpointing")
    with gr.Accordion("Save / load settings and the equivalent command", open=False):
        with gr.Row():
            ui.save_config = gr.Button("Save settings (YAML)", size="sm")
            ui.config_file = gr.UploadButton("Load settings…", file_types=[".yaml", ".yml", ".json"], size="sm")
        ui.saved_config = gr.File(label="Settings file", visible=False)
        ui.config_status = gr.Markdown()
        ui.cli = gr.Markdown(elem_id="cli-command")

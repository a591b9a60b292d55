"""Model & LoRA tab: the base model, the adapter and the hyperparameters, with a live estimate.

The target-module checkboxes list the chosen model's real layer names, read from a model built on
the meta device (no weights loaded, so switching models costs a second, not a download).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import gradio as gr
import torch
import yaml

from lora_app.errors import UserError
from lora_app.hardware import choose_precision
from lora_app.lora import DEFAULT_TARGETS, resolve_targets
from lora_app.lora.targets import leaf_names
from lora_app.models import default_device, meta_model
from lora_app.training.config import TrainConfig
from lora_app.training.memory import estimate_memory
from lora_app.ui.common import explain, fmt_bytes, fmt_count, friendly, model_config_for
from lora_app.ui.data_tab import dataset_label
from lora_app.ui.form import FIELDS, SETTINGS, cli_command, config_from_values, default_config, form_values, widget

MODEL_CHOICES = ["default"]


@functools.lru_cache(maxsize=4)
def meta_model_for(model: str):
    """The architecture without weights, kept per model name (switching back costs nothing)."""
    return meta_model(model_config_for(model))


@functools.lru_cache(maxsize=8)
def model_layers(model: str) -> tuple[list[str], list[str], str]:
    """(adaptable module names, the architecture's default targets, a one-line description)."""
    config = model_config_for(model)
    meta = meta_model_for(model)
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


def estimate_text(config) -> str:
    """Trainable parameters and the memory estimate for ``config``, or what is wrong with it."""
    problems = [text for name, text in config.problems().items() if name not in ("data", "output")]
    if problems:
        return "**Fix these settings:**\n" + "\n".join(f"- {p}" for p in problems)
    resolve_targets(meta_model_for(config.model), config.targets)  # the estimate would guess; say what matches instead
    device = torch.device(default_device()).type
    e = estimate_memory(config, model_config_for(config.model), device, choose_precision(config.precision, device))
    share = 100 * e["trainable_params"] / max(e["total_params"], 1)
    return (f"**{fmt_count(e['trainable_params'])} trainable parameters** ({share:.2f} % of {fmt_count(e['total_params'])}) · "
            f"estimated memory **{fmt_bytes(e['total_bytes'])}** (weights {fmt_bytes(e['weights_bytes'])}, "
            f"adapter + gradients + optimizer {fmt_bytes(e['adapter_bytes'] + e['gradients_bytes'] + e['optimizer_bytes'])}, "
            f"activations {fmt_bytes(e['activations_bytes'])}, runtime {fmt_bytes(e['runtime_bytes'])}"
            + (f", loading the base before quantizing it {fmt_bytes(e['loading_bytes'])}" if e["loading_bytes"] else "")
            + ") · "
            f"**{e['precision']}**: {e['precision_reason']}")


@friendly
def summarize(data_path, *values):
    """(estimate markdown, CLI command, one-line run summary for the Train tab) for the form as it stands."""
    config = config_from_values(dict(zip(FIELDS, values)))
    config.data = data_path or "DATASET"
    try:
        estimate = estimate_text(config)
    except Exception as err:  # a layer name the model lacks, an unknown hub id: say so next to the form
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
    config = config_from_values(dict(zip(FIELDS, values)))
    config.data = data_path
    settings = {k: v for k, v in config.to_dict().items() if k not in ("output", "resume")}
    folder = Path(tempfile.mkdtemp(prefix="lora-config-"))
    path = folder / "lora_config.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return str(path)


def form_updates(config: TrainConfig) -> list:
    """One update per FIELDS widget to show ``config``, then the model's description. The target boxes
    list the model's layers, with the architecture's defaults ticked when ``config`` names none."""
    values = form_values(config)
    try:
        names, defaults, about = model_layers(config.model)
    except Exception as err:  # a model that cannot be read now (offline, moved): the settings still load
        names, defaults, about = values["targets"], [], f"**Cannot read this model:** {explain(err)}"
    if not values["targets"] and not values["all_linear"]:
        values["targets"] = defaults
    targets = gr.update(choices=sorted(set(names) | set(values["targets"])), value=values["targets"])
    return [targets if name == "targets" else values[name] for name in FIELDS] + [about]


def settings_of(stored: dict) -> TrainConfig:
    """The page defaults overridden by ``stored`` settings (a run's, a file's), minus where the run lives."""
    config = default_config()
    for key, value in TrainConfig.from_dict(stored).to_dict().items():
        if key not in ("output", "resume", "data"):
            setattr(config, key, value)
    return config


@friendly
def load_config_file(path):
    """Form values from an uploaded YAML/JSON config: one update per field, the model's description and
    a status line."""
    if not path:
        raise UserError("Choose a YAML or JSON config file first.")
    return (*form_updates(settings_of(TrainConfig.from_file(path).to_dict())),
            f"Loaded settings from **{Path(path).name}**.")


def restore_form(saved):
    """The form as this browser last left it (``saved``: widget values by FIELDS name): one update per
    field, then the model's description. A first visit keeps the page as built (the defaults) but for
    the model's layers, so that what the user changes while the page loads is not put back."""
    if saved:
        return form_updates(config_from_values(saved))
    updates = form_updates(default_config())
    return [update if name == "targets" else gr.skip() for name, update in zip(FIELDS, updates)] + updates[-1:]


def remember_form(*values) -> dict:
    """What the browser keeps of the form (restored by ``restore_form`` after a reload or a restart)."""
    return dict(zip(FIELDS, values))


def build(ui) -> None:
    d = form_values(default_config())
    f = ui.form

    def add(name, **options):
        f[name] = widget(name, d[name], **options)

    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                f["model"] = gr.Dropdown(MODEL_CHOICES, value=d["model"], allow_custom_value=True, label="Base model",
                                         info=SETTINGS["model"].metadata["help"], scale=3, elem_id="model-picker")
                add("quantization", scale=2)
            ui.model_about = gr.Markdown(elem_id="model-about")
        with gr.Column(scale=2):
            ui.estimate = gr.Markdown(elem_id="estimate")
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Adapter")
            with gr.Row():
                add("variant")
                add("rank", slider=(1, 256, 1))
            with gr.Row():
                add("alpha")
                ui.alpha_ratio = gr.Textbox(alpha_ratio(d["rank"], d["alpha"], d["variant"]), label="Scale",
                                            interactive=False)
            with gr.Row():
                add("dropout", slider=(0, 0.5, 0.01))
                add("lora_plus_ratio")
            f["all_linear"] = gr.Checkbox(value=d["all_linear"], label="All linear layers (all-linear)")
            f["targets"] = gr.CheckboxGroup([], value=d["targets"], label="Target modules",
                                            info=f"Nothing ticked: {SETTINGS['targets'].metadata['unset']}",
                                            elem_id="targets")
        with gr.Column():
            gr.Markdown("### Training")
            for row in (("max_steps", "epochs"), ("batch_size", "grad_accum"), ("lr", "scheduler"),
                        ("warmup", "seq_len"), ("val_fraction", "eval_every")):
                with gr.Row():
                    for name in row:
                        add(name)
            with gr.Accordion("More", open=False):
                for row in (("save_every", "log_every", "seed"), ("precision", "weight_decay", "max_grad_norm"),
                            ("batching", "gradient_checkpointing", "double_quant"), ("delta_lambda",)):
                    with gr.Row():
                        for name in row:
                            add(name)
    with gr.Accordion("Save / load settings and the equivalent command", open=False):
        with gr.Row():
            ui.save_config = gr.Button("Save settings (YAML)", size="sm")
            ui.config_file = gr.UploadButton("Load settings…", file_types=[".yaml", ".yml", ".json"], size="sm")
        ui.saved_config = gr.File(label="Settings file", visible=False)
        ui.config_status = gr.Markdown()
        ui.cli = gr.Markdown(elem_id="cli-command")

"""Data tab: upload a dataset (or take the demo), see what the model will be trained on.

The preview runs the training pipeline itself (``preview_dataset``), so what is shown is exactly what
training will use. Uploaded files are copied into the app's datasets folder, because Gradio's upload
cache is temporary and a run (or its resume, hours later) reads the file again.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go

from lora_app.data import DEMO_DATASET, DataError, preview_dataset
from lora_app.paths import app_home, atomic_file
from lora_app.training.batches import padding_share
from lora_app.training.config import BATCHINGS
from lora_app.ui.common import friendly, tokenizer_for
from lora_app.ui.form import SETTINGS, config_from_values, default_config, form_values, widget

FILE_TYPES = [".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".txt"]


def datasets_dir() -> Path:
    folder = app_home() / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def import_dataset(path: str | None) -> str | None:
    """Copy an uploaded file to ``datasets/<content hash>/<its name>``: the same content is stored once,
    and the file keeps the name the user knows."""
    if not path:
        return None
    source = Path(path)
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    target = datasets_dir() / digest.hexdigest()[:12] / source.name
    if not target.exists():
        atomic_file(target, lambda tmp: shutil.copyfile(source, tmp))
    return str(target)


def dataset_label(path: str | None) -> str:
    """The file name the user knows (copies stored by earlier versions carry a ``<hash>-`` prefix)."""
    if not path:
        return ""
    name = Path(path).name
    return name[13:] if re.match(r"^[0-9a-f]{12}-", name) else name


def length_histogram(lengths, seq_len: int):
    """Token lengths per example as bars, with the sequence-length limit as a line."""
    edges = lengths.hist_edges
    centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    widths = [b - a for a, b in zip(edges, edges[1:])]
    fig = go.Figure(go.Bar(x=centers, y=lengths.hist_counts, width=widths, marker_color="#6366f1",
                           hovertemplate="%{x:.0f} tokens: %{y} examples<extra></extra>"))
    if seq_len and edges and seq_len <= edges[-1] * 1.5:
        fig.add_vline(x=seq_len, line_dash="dash", line_color="#ef4444",
                      annotation_text=f"sequence length {seq_len}", annotation_position="top left")
    fig.update_layout(title="Tokens per example", xaxis_title="tokens", yaxis_title="examples", height=300,
                      margin=dict(l=50, r=20, t=40, b=40), bargap=0.05, showlegend=False)
    return fig


# the settings the preview depends on, in the order ``preview`` takes them after the dataset
PREVIEW_FIELDS = ("model", "data_format", "data_mapping", "template", "system_prompt", "default_system_prompt",
                  "train_on_prompt", "seq_len", "batching", "batch_size", "val_fraction")


@friendly
def preview(data_path, *values):
    """(status markdown, preview html, histogram) for the current file and the PREVIEW_FIELDS settings."""
    if not data_path:
        return "Upload a dataset or use the demo dataset to see a preview.", "", None
    c = config_from_values({k: v for k, v in zip(PREVIEW_FIELDS, values) if v is not None})
    try:
        result = preview_dataset(data_path, tokenizer_for(c.model), format=c.data_format, mapping=c.data_mapping,
                                 template=c.template, train_on_prompt=bool(c.train_on_prompt), seq_len=int(c.seq_len),
                                 system=c.system(), packing=c.batching == "packed", val_fraction=float(c.val_fraction))
    except DataError as err:
        # the message names the stored copy (hash-prefixed); show the name the user uploaded
        message = str(err).replace(Path(data_path).name, dataset_label(data_path))
        return f"**This dataset cannot be used yet.**\n\n{message}", "", None
    r = result.report
    status = (f"**{r.format}** format · {r.train_rows} training rows · {r.val_rows} validation rows"
              + (f" · {r.rows_skipped} skipped" if r.rows_skipped else "")
              + (f" · {r.truncated} truncated" if r.truncated else "")
              + "\n\n" + padding_line(result.token_counts, c))
    return status, result.to_html(), length_histogram(result.lengths, r.seq_len)


def padding_line(lengths: list[int], config) -> str:
    """The share of compute each batching would spend on padding, the chosen one in bold."""
    lengths = [min(n, config.seq_len) for n in lengths]
    shares = [(name, padding_share(lengths, config.batch_size, name, config.seq_len, config.seed))
              for name in BATCHINGS]
    return (f"Padding at batch size {config.batch_size}: "
            + " · ".join(f"**{name} {share:.0%}**" if name == config.batching else f"{name} {share:.0%}"
                         for name, share in shares))


def use_demo() -> tuple[str, str, str]:
    """(dataset path, file box, status line) for the demo dataset."""
    if not Path(DEMO_DATASET).exists():
        raise gr.Error("The demo dataset is missing from this installation (assets/).")
    path = str(DEMO_DATASET)
    return path, path, f"Using the demo dataset **{Path(DEMO_DATASET).name}**: a pirate persona, Captain Byte."


def on_upload(file):
    """Store the uploaded file; (dataset path, status line)."""
    path = import_dataset(file)
    if path is None:
        return None, "No dataset yet."
    return path, f"Uploaded **{Path(file).name}**."


def restore(path, why: str = "chosen before the page was reloaded"):
    """A dataset chosen earlier, if its file is still there: (dataset path, file box, status line).
    Nothing chosen earlier changes nothing, so a file uploaded while the page loads is kept."""
    if path and Path(path).is_file():
        return path, path, f"Using **{dataset_label(path)}** ({why})."
    if path:
        return None, None, f"**{dataset_label(path)}** is no longer there ({why}); upload it again."
    return gr.skip(), gr.skip(), gr.skip()


def preview_restored(data_path, *values):
    """The preview of a restored dataset (none restored: the page's preview is left as it is)."""
    return preview(data_path, *values) if data_path else (gr.skip(), gr.skip(), gr.skip())


def build(ui) -> None:
    """The Data tab's widgets (wired in ``app.wire``, since the preview reads other tabs' settings)."""
    gr.Markdown("Upload JSON, JSONL, CSV/TSV, Parquet or TXT. The format is detected; override it below if "
                "it guessed wrong. The preview shows exactly what the model will be trained on.")
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            ui.data_file = gr.File(label="Dataset file", file_types=FILE_TYPES, height=150, elem_id="data-file")
            ui.demo_button = gr.Button("Use the demo dataset (Captain Byte)", size="sm", elem_id="use-demo")
            ui.data_status = gr.Markdown("No dataset yet.", elem_id="data-status")
            d = form_values(default_config())
            ui.form["system_prompt"] = widget("system_prompt", d["system_prompt"], lines=2, elem_id="system-prompt")
            ui.form["default_system_prompt"] = widget("default_system_prompt", d["default_system_prompt"],
                                                      elem_id="default-system-prompt")
            with gr.Accordion("Format and column mapping", open=False):
                ui.form["data_format"] = widget("data_format", d["data_format"])
                ui.mapping = ui.form["data_mapping"] = gr.Textbox(
                    label="Column mapping (field=column, ...)", placeholder="prompt=question, completion=answer",
                    info=SETTINGS["data_mapping"].metadata["help"])
                ui.form["template"] = widget("template", d["template"])
                ui.form["train_on_prompt"] = widget("train_on_prompt", d["train_on_prompt"])
        with gr.Column(scale=3, min_width=400):
            ui.length_plot = gr.Plot(label="Token lengths", elem_id="length-plot", show_label=False)
    ui.preview_status = gr.Markdown("", elem_id="preview-status")
    ui.preview_html = gr.HTML("", elem_id="data-preview", max_height=520)

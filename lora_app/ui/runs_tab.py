"""Runs & adapters tab: every run with its status and final numbers, a config diff between two runs,
and what to do with an adapter: chat with it, download it, export a merged model, delete the run,
or bring in an adapter trained elsewhere."""

from __future__ import annotations

import html
import shutil
import time
from pathlib import Path

import gradio as gr

from lora_app.ui import adapters, charts, data_tab, judge, model_tab
from lora_app.errors import InferenceError, RunNotFound, UserError
from lora_app.data import PromptFormat
from lora_app.inference import push_to_hub, zip_adapter
from lora_app.inference.space import ModelCard, write_space
from lora_app.model_source import base_model_id
from lora_app.inference.gguf_export import GGUF_TYPES
from lora_app.inference.template_check import run_conversations
from lora_app.training.config import TrainConfig
from lora_app.ui.common import fmt_bytes, fmt_count, fmt_seconds, run_store, tokenizer_for

HEADERS = ["run", "status", "model", "variant · rank", "steps", "final loss", "eval loss", "tokens/s", "time",
           "created"]


def _num(value, digits=4):
    return "–" if value is None else f"{value:.{digits}f}"


def runs_table(runs=None) -> list[list]:
    runs = run_store().list() if runs is None else runs
    rows = []
    for r in runs:
        s, c = r.summary or {}, r.config or {}
        rows.append([r.name, r.status, _model_label(c.get("model")), f"{c.get('variant', '?')} · r{c.get('rank', '?')}",
                     f"{s.get('steps') or r.step}/{r.total_steps or '?'}", _num(s.get("final_loss")), _num(s.get("eval_loss")),
                     _num(s.get("useful_tokens_per_second"), 0), fmt_seconds(s.get("wall_seconds")) if s else "–",
                     time.strftime("%m-%d %H:%M", time.localtime(r.created))])
    return rows


def _model_label(model) -> str:
    model = model or "default"
    return Path(model).name if "/" in model and Path(model).exists() else model


def run_choices(runs=None) -> list[tuple[str, str]]:
    runs = run_store().list() if runs is None else runs
    return [(f"{r.name} · {r.status}", r.id) for r in runs]


def config_diff(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(setting, a's value, b's value) for every setting that differs, in TrainConfig order."""
    keys = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k) and k not in ("output", "resume")]


def run_details(run_id, other_id=None) -> str:
    """Markdown: what the run is, how it went, and how its settings differ from another run's (or the
    CLI defaults when no other run is picked)."""
    if not run_id:
        return "Pick a run to see its details."
    store = run_store()
    try:
        run = store.get(run_id)
    except RunNotFound as err:
        return str(err)
    s = run.summary or {}
    lines = [f"### {run.name} — {run.status}", f"Folder: `{run.output}`"]
    if s:
        lines.append(f"Final loss **{_num(s.get('final_loss'))}** · eval loss **{_num(s.get('eval_loss'))}** · "
                     f"{s.get('steps')} steps · {fmt_count(s.get('train_tokens'))} trained tokens · "
                     f"{_num(s.get('useful_tokens_per_second'), 0)} tokens/s · {fmt_seconds(s.get('wall_seconds'))} · "
                     f"peak memory {fmt_bytes(s.get('peak_memory_bytes'))} (estimate {fmt_bytes(s.get('memory_estimate_bytes'))}) · "
                     f"{fmt_count(s.get('trainable_params'))} trainable parameters"
                     + (f" · {s['precision']}: {s['precision_reason']}" if s.get("precision_reason") else ""))
    if run.promoted_step is not None:
        lines.append(judge.promotion_note(run))
    if run.error:
        lines.append(f"```\n{run.error.strip()[-1500:]}\n```")
    if other_id and other_id != run_id:
        try:
            other = store.get(other_id)
        except RunNotFound:
            other = None
        base, base_label = (other.config, other.name) if other else (TrainConfig().to_dict(), "defaults")
    else:
        base, base_label = TrainConfig().to_dict(), "CLI defaults"
    diff = config_diff(run.config or {}, base)
    if diff:
        table = [f"| setting | {run.name} | {base_label} |", "|---|---|---|"]
        table += [f"| {k} | {_cell(v)} | {_cell(w)} |" for k, v, w in diff]
        lines += [f"**Settings that differ from {base_label}:**", "\n".join(table)]
    else:
        lines.append(f"Same settings as {base_label}.")
    return "\n\n".join(lines)


def _cell(value) -> str:
    text = "–" if value is None else str(value)
    if len(text) > 60:
        text = "…" + text[-57:]
    return text.replace("|", "\\|")


def _get(run_id):
    if not run_id:
        raise UserError("Pick a run first.")
    return run_store().get(run_id)


def _adapter_of(run_id):
    run = _get(run_id)
    if not run.adapter_path.is_dir():
        raise UserError(f"Run {run.name} has no final adapter yet (it is {run.status}).")
    return run


def zip_run(run_id) -> str:
    """The run's adapter as a zip (standard layout: loads in peft, vLLM, TGI and here)."""
    run = _adapter_of(run_id)
    return str(zip_adapter(run.adapter_path, Path(run.output) / f"{adapters.adapter_name(run)}-adapter.zip",
                           overwrite=True))


def export_merged(run_id) -> str:
    """Write the base model with the run's adapter merged in, as a plain transformers folder."""
    run = _adapter_of(run_id)
    folder = Path(run.output) / ("merged" if run.promoted_step is None else f"merged-step{run.promoted_step}")
    if folder.exists() and any(folder.iterdir()):
        return f"A merged model already exists in `{folder}`."
    base = adapters.base_for(run.config.get("model"), None, for_export=True)
    name = adapters.resolve(base, f"run:{run.id}")
    path = base.export_merged(folder, adapters=name)
    return (f"Merged model written to `{path}`: load it with "
            f"`AutoModelForCausalLM.from_pretrained(\"{path}\")`, no adapter needed.")


def export_gguf(run_id, gguf_type, progress=gr.Progress()) -> str:
    """The run's model (adapter merged) as one GGUF file with an Ollama Modelfile, in the run's
    ``export`` folder, and the template check of both against training."""
    run = _adapter_of(run_id)
    target = Path(run.output) / "export" / f"{adapters.adapter_name(run)}-{gguf_type}.gguf"
    base = adapters.base_for(run.config.get("model"), None, for_export=True)
    name = adapters.resolve(base, f"run:{run.id}")
    done = base.export_gguf(target, name, PromptFormat.load(run.adapter_path), gguf_type=gguf_type,
                            conversations=run_conversations(run.adapter_path), name=run.name, overwrite=True,
                            progress=lambda i, n: progress((i, n), desc="writing the GGUF file"))
    lines = [f"GGUF written to `{done.gguf}` ({fmt_bytes(done.gguf.stat().st_size)}): it runs in llama.cpp "
             f"(`llama-cli -m {done.gguf}`) and LM Studio."]
    lines += [("✅ " if check.identical else "⚠️ **") + check.line() + ("" if check.identical else "**")
              for check in done.checks]
    lines += done.notes
    if done.modelfile:
        lines.append(f"Ollama: `{done.ollama_command(adapters.adapter_name(run).lower())}`")
    try:  # the adapter alone, for llama.cpp's --lora on the base model's GGUF
        alone = base.export_adapter_gguf(target.with_name(f"{adapters.adapter_name(run)}-lora.gguf"), name,
                                         overwrite=True)
        lines.append(f"The adapter alone: `{alone}` (`llama-server -m BASE.gguf --lora {alone.name}`).")
    except InferenceError as err:
        lines.append(f"No adapter-only GGUF: {err}")
    return "\n\n".join(lines)


CARD_SETTINGS = ("variant", "rank", "alpha", "targets", "max_steps", "epochs", "lr", "batch_size", "seq_len",
                 "system_prompt", "default_system_prompt")


def publish(run_id, repo: str | None = None) -> str:
    """A chat Space of the run's own in its ``space`` folder; with a repo id (and ``HF_TOKEN``), pushed."""
    run = _adapter_of(run_id)
    config = TrainConfig.from_dict(run.config)
    summary = run.summary or {}
    trained = PromptFormat.load(run.adapter_path)
    if trained is None:
        raise UserError(f"Run {run.name} was trained on raw text: a chat Space needs a chat model.")
    found = next((p["detail"] for p in run.phases if p["phase"] == "preparing data"), "")  # "28 rows, 891 tokens"
    card = ModelCard(title=run.name, base=base_model_id(config.model),
                     data=data_tab.dataset_label(config.data) + (f" ({found})" if found else ""),
                     settings={key: getattr(config, key) for key in CARD_SETTINGS},
                     final_loss=summary.get("final_loss"), eval_loss=summary.get("eval_loss"),
                     losses=[(m["step"], m["loss"]) for m in run_store().metrics(run.id) if "loss" in m])
    folder = write_space(Path(run.output) / "space", run.adapter_path, trained, tokenizer_for(config.model), card)
    said = f"Space folder written to `{folder}`: `python {folder / 'app.py'}` runs it here."
    if (repo or "").strip():
        said += f" Pushed to {push_to_hub(folder, repo.strip(), private=True, space=True)}."
    return said


def ask_delete(run_id):
    """First click: show the confirmation row (deleting is not undoable)."""
    run = _get(run_id)
    if run.status in ("queued", "running"):
        raise UserError(f"Run {run.name} is {run.status}: cancel it first.")
    return gr.update(visible=True), f"Delete **{run.name}** and its folder? This cannot be undone."


def delete_run(run_id):
    """Forget the run and remove its folder when it lives in the runs folder (a CLI run's own
    --output folder is left on disk: it is the user's)."""
    run = _get(run_id)
    if run.status in ("queued", "running"):
        raise UserError(f"Run {run.name} is {run.status}: cancel it first.")
    store = run_store()
    store.delete(run.id)
    output = Path(run.output)
    inside = output.resolve().is_relative_to(store.root.resolve())
    if inside and output.is_dir():
        shutil.rmtree(output, ignore_errors=True)
    kept = "" if inside else f" Its folder `{output}` was left on disk."
    return f"Deleted **{run.name}**.{kept}"


def upload_adapter(path, model) -> str:
    """Load an adapter zip (or a run/adapter folder path) onto the chat model; returns a message."""
    if not path:
        raise UserError("Choose an adapter .zip first (adapter_config.json + adapter_model.safetensors).")
    base = adapters.base_for(model, None)
    name = base.load_adapter(path)
    return f"Loaded adapter **{name}** onto `{model or 'default'}`: pick it in Chat or Compare."


def refresh(selected, other, overlaid):
    runs = run_store().list()
    choices = run_choices(runs)
    ids = {c[1] for c in choices}
    selected = selected if selected in ids else (choices[0][1] if choices else None)
    other = other if other in ids else None
    overlaid = [i for i in overlaid or [] if i in ids]
    return (runs_table(runs), gr.update(choices=choices, value=selected), gr.update(choices=choices, value=other),
            run_details(selected, other), gr.update(choices=choices, value=overlaid), *overlay(overlaid))


OVERLAY_FIGURES = ("final loss", "eval loss", "tokens/s", "time")


def overlay(run_ids):
    """(chart, table) for the runs selected to overlay: their loss and eval-loss curves on one chart,
    and a table of the settings that differ between them with their final figures."""
    store = run_store()
    runs = [store.get(i) for i in run_ids or []]
    if not runs:
        return charts.overlay_figure([]), "Select runs to overlay their curves."
    figure = charts.overlay_figure([(r.name, store.metrics(r.id)) for r in runs])
    configs = [r.config or {} for r in runs]
    keys = [k for k in dict.fromkeys(k for c in configs for k in c)
            if k not in ("output", "resume", "data") and len({_cell(c.get(k)) for c in configs}) > 1]
    header = ["run", "status", *keys, *OVERLAY_FIGURES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, c in zip(runs, configs):
        s = r.summary or {}
        figures = [_num(s.get("final_loss")), _num(s.get("eval_loss")), _num(s.get("useful_tokens_per_second"), 0),
                   fmt_seconds(s.get("wall_seconds")) if s else "–"]
        lines.append("| " + " | ".join([_cell(r.name), r.status, *(_cell(c.get(k)) for k in keys), *figures]) + " |")
    return figure, "\n".join(lines)


def compare_runs(run_ids):
    """To the Compare tab with the selected runs' adapters loaded (on the first run's base model):
    (tabs, base model, adapters, a note where the comparison will show)."""
    runs = [run_store().get(i) for i in run_ids or []]
    ready = [r for r in runs if r.adapter_path.is_dir()]
    if not ready:
        raise UserError("Select finished runs to compare (a run has an adapter once it completes).")
    model = ready[0].config.get("model") or "default"
    same = [r for r in ready if adapters.same_model(r.config.get("model"), model)]
    left = [r.name for r in runs if r not in same]
    said = f"Loaded {', '.join(r.name for r in same)}: type a prompt and press Compare." + (
        f" Left out (no adapter yet, or another base model): {', '.join(left)}." if left else "")
    return (gr.update(selected="compare"), model,
            gr.update(choices=adapters.adapter_choices(model), value=[f"run:{r.id}" for r in same]),
            f"<p class='lora-note'>{html.escape(said)}</p>")


def load_settings(run_id):
    """A past run's settings back on the form, its dataset included: the form's updates, the model's
    description, (dataset path, file box, data status), the tab to show and a status line."""
    if not run_id:
        raise UserError("Pick a run first.")
    run = run_store().get(run_id)
    form = model_tab.form_updates(model_tab.settings_of(run.config))
    data = data_tab.restore(run.config.get("data"), f"the dataset of run {run.name}")
    return (*form, *data, gr.update(selected="model"), f"Loaded the settings of run **{run.name}**.")


def build(ui) -> None:
    with gr.Row():
        ui.runs_refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100, elem_id="runs-refresh")
    ui.runs_table = gr.Dataframe(headers=HEADERS, value=[], interactive=False, elem_id="runs-table", max_height=280,
                                 show_search="search", wrap=True,
                                 column_widths=["24%", "9%", "11%", "9%", "7%", "8%", "8%", "7%", "7%", "10%"])
    with gr.Row(equal_height=True):
        ui.runs_pick = gr.Dropdown([], label="Run", scale=2, elem_id="runs-pick")
        ui.runs_other = gr.Dropdown([], label="Compare settings with", info="empty: the CLI defaults", scale=2)
    with gr.Row():
        ui.runs_chat = gr.Button("Chat with this adapter", variant="primary", size="sm")
        ui.runs_load = gr.Button("Load its settings", size="sm", elem_id="runs-load")
        ui.runs_zip = gr.Button("Download adapter (.zip)", size="sm")
        ui.runs_merge = gr.Button("Export merged model", size="sm")
        ui.runs_gguf_type = gr.Dropdown(list(GGUF_TYPES), value="q8_0", show_label=False, container=False,
                                        min_width=90, scale=0, elem_id="runs-gguf-type")
        ui.runs_gguf = gr.Button("Export GGUF + Ollama", size="sm", elem_id="runs-gguf")
        ui.runs_delete = gr.Button("Delete…", variant="stop", size="sm")
    with gr.Row(equal_height=True):
        ui.runs_space_repo = gr.Textbox(placeholder="user/space-name (empty: only write the folder)", show_label=False,
                                        container=False, scale=3, elem_id="runs-space-repo")
        ui.runs_publish = gr.Button("Publish as a chat Space", size="sm", scale=1, elem_id="runs-publish")
    with gr.Row(visible=False) as ui.runs_confirm_row:
        ui.runs_confirm = gr.Button("Yes, delete it", variant="stop", size="sm")
        ui.runs_keep = gr.Button("Keep it", size="sm")
    ui.runs_status = gr.Markdown(elem_id="runs-status")
    ui.runs_file = gr.File(label="Adapter zip", visible=False)
    ui.runs_details = gr.Markdown(elem_id="run-details")
    judge.build(ui)
    with gr.Accordion("Overlay runs (a sweep, say)", open=True):
        with gr.Row(equal_height=True):
            ui.runs_overlay = gr.Dropdown([], value=[], multiselect=True, label="Runs to overlay", scale=4,
                                          elem_id="runs-overlay")
            ui.runs_compare = gr.Button("Open them in Compare", size="sm", scale=1, elem_id="runs-compare")
        ui.overlay_chart = gr.Plot(show_label=False, elem_id="overlay-chart")
        ui.overlay_table = gr.Markdown(elem_id="overlay-table")
    with gr.Accordion("Upload an adapter trained elsewhere", open=False):
        gr.Markdown("A .zip holding `adapter_config.json` and `adapter_model.safetensors` (peft's layout). It is "
                    "loaded onto the model chosen in the Chat tab.")
        ui.adapter_upload = gr.File(label="Adapter .zip", file_types=[".zip"], height=120)

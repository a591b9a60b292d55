"""Compare tab: one prompt through the base model and several adapters (and a mix), side by side,
with the same settings and seed, each column with its speed. Columns appear as they finish."""

from __future__ import annotations

import html

import gradio as gr

from lora_app.ui import adapters
from lora_app.ui.chat_tab import generation_settings, system_prompt, system_widgets
from lora_app.errors import UserError


def columns_html(columns: list[tuple[str, str | None, str]]) -> str:
    """(label, text or None while pending, footer) per column."""
    cells = []
    for label, text, footer in columns:
        body = "<p class='lora-pending'>…</p>" if text is None else f"<p>{html.escape(text) or '<i>(empty)</i>'}</p>"
        cells.append(f"<div class='lora-column'><h4>{html.escape(label)}<small>{html.escape(footer)}</small></h4>{body}</div>")
    return f"<div class='lora-compare'>{''.join(cells)}</div>"


def run_compare(prompt, model, choices, include_base, mix_weights, system, use_default, temperature, max_new_tokens,
                seed):
    """Yield the comparison grid as columns finish."""
    if not prompt or not prompt.strip():
        raise UserError("Type a prompt to compare.")
    choices = list(choices or [])
    if not choices and not include_base:
        raise UserError("Choose the base model and/or at least one adapter.")
    settings = generation_settings(temperature, 1.0, 0, max_new_tokens, 1.1, seed)
    base = adapters.base_for(model, None)
    names = [adapters.resolve(base, c) for c in choices]
    mix = None
    if (mix_weights or "").strip():
        if len(names) < 2:
            raise UserError("A mix column needs at least two adapters.")
        mix = dict(zip(names, adapters.parse_weights(mix_weights, len(names))))
    labels = (["base"] if include_base else []) + names + (["mix"] if mix else [])
    done: list[tuple[str, str, str]] = []
    yield columns_html([(label, None, "") for label in labels])
    for result in base.iter_compare(prompt, names, mix=mix, include_base=bool(include_base),
                                    system=system_prompt(system, use_default),
                                    settings=settings):
        g = result.generation
        done.append((result.label, result.text, f"{g.new_tokens} tokens · {g.tokens_per_s:.1f} tok/s"))
        yield columns_html(done + [(label, None, "") for label in labels[len(done):]])


def build(ui) -> None:
    gr.Markdown("One prompt through the base model and each chosen adapter with the same settings and seed. "
                "The base model is the one chosen in the Chat tab.")
    with gr.Row():
        with gr.Column(scale=3):
            ui.cmp_prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Who are you?", elem_id="compare-prompt")
        with gr.Column(scale=2):
            ui.cmp_adapters = gr.Dropdown([], value=[], multiselect=True, label="Adapters", elem_id="compare-adapters")
            with gr.Row():
                ui.cmp_base = gr.Checkbox(value=True, label="Include the base model")
                ui.cmp_mix = gr.Textbox(label="Add a mix column (weights)", placeholder="e.g. 0.5, 0.5")
    with gr.Accordion("Settings (the same for every column)", open=False):
        with gr.Row():
            with gr.Column(scale=2):
                ui.cmp_system, ui.cmp_default_system = system_widgets("compare")
                ui.cmp_note = gr.Markdown(elem_id="compare-note")
            ui.cmp_temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            ui.cmp_max_tokens = gr.Slider(8, 512, value=128, step=8, label="Max new tokens")
            ui.cmp_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
    ui.cmp_run = gr.Button("Compare", variant="primary", elem_id="compare-run")
    ui.cmp_out = gr.HTML(elem_id="compare-out")

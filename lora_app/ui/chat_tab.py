"""Chat tab: streaming chat with the base model, one adapter, a weighted mix, or merged weights.

The mode is read on every message, so it can change mid-conversation: the history stays and the next
reply comes from the newly chosen model. Each session passes its own mode with its request, so two
browser tabs chatting with different adapters on the same base never see each other's choice.
"""

from __future__ import annotations

import gradio as gr

from lora_app.data import PromptFormat, SystemPrompt
from lora_app.inference import GenerationSettings
from lora_app.inference.template_check import run_conversations
from lora_app.paths import app_home
from lora_app.ui import adapters
from lora_app.ui.common import explain
from lora_app.ui.form import start_model


def generation_settings(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed):
    def whole(value):
        return int(value) if isinstance(value, float) and value.is_integer() else value

    return GenerationSettings(max_new_tokens=whole(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                              top_k=whole(top_k), repetition_penalty=float(repetition_penalty),
                              seed=None if seed in (None, "") else whole(seed))


def refresh_adapters(model, current):
    """Adapter choices for ``model``. The selection is left alone unless part of it is gone: events
    can race (the Runs tab selects an adapter while this refresh runs), so only prune, never reset."""
    choices = adapters.adapter_choices(model)
    values = {v for _, v in choices}
    kept = [c for c in (current or []) if c in values]
    return gr.update(choices=choices, value=kept) if len(kept) != len(current or []) else gr.update(choices=choices)


def trained_system(choices):
    """(system prompt box, template-default switch, status line) for the chosen adapters; left as they
    are when no chosen adapter says how it was trained."""
    system, said = adapters.trained_system(choices)
    if not said:
        return gr.skip(), gr.skip(), gr.skip()
    return system.text or "", system.use_default, said


def system_prompt(text, use_default) -> SystemPrompt:
    """The page's system prompt box and template-default switch as one ``SystemPrompt``."""
    return SystemPrompt.typed(text, use_default)


def respond(message, history, model, kind, choices, weights, system, use_default, temperature, top_p, top_k,
            max_new_tokens, repetition_penalty, seed):
    """Stream the reply: yields (chat history, textbox value, status line). Errors end up in the status
    line and the history is left as it was, so the conversation can go on."""
    history = list(history or [])
    if not message or not str(message).strip():
        yield history, message, "Type a message first."
        return
    try:
        settings = generation_settings(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
        yield history + [{"role": "user", "content": message}], "", "Loading the model…"
        base = adapters.base_for(model, None)
        mode = adapters.mode_for(base, kind, choices, weights)
        stream = base.stream(message, history=history, system=system_prompt(system, use_default), settings=settings,
                             mode=mode)
        reply = ""
        shown = history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        for piece in stream:
            reply += piece
            shown[-1] = {"role": "assistant", "content": reply}
            yield shown, "", f"Answering as **{mode.label}**…"
        result = stream.result
        shown[-1] = {"role": "assistant", "content": result.text or reply}
        yield shown, "", (f"**{result.mode}** · {result.new_tokens} tokens · {result.tokens_per_s:.1f} tokens/s ({base.precision})"
                          + (" · stopped at the token limit" if result.finish_reason == "length" else ""))
    except Exception as err:  # the chat stays usable: the message goes back in the box, the reason shows
        yield history, message, f"⚠️ {explain(err)}"


def export_gguf(model, kind, choices, weights, progress=gr.Progress()):
    """The model as chatted with (the chosen adapters merged in, as the mode weighs them) as one GGUF
    file with its Modelfile, under the app's exports folder; the status line says where and what the
    template check found."""
    base = adapters.base_for(model, None, for_export=True)
    mode = adapters.mode_for(base, kind, choices, weights)
    folder = adapters.adapter_folder(choices[0]) if choices else None
    name = "-".join(mode.adapters) or "base"
    done = base.export_gguf(app_home() / "exports" / f"{name}-q8_0.gguf", dict(mode.adapters),
                            PromptFormat.load(folder) if folder else None, gguf_type="q8_0",
                            conversations=run_conversations(folder), name=name, overwrite=True,
                            progress=lambda i, n: progress((i, n), desc="writing the GGUF file"))
    checks = " · ".join(check.line() for check in done.checks)
    return f"GGUF written to `{done.gguf}`. {checks}".strip()


def undo(history):
    """Drop the last exchange (user turn and the reply after it)."""
    history = list(history or [])
    while history and history[-1]["role"] != "user":
        history.pop()
    if history:
        history.pop()
    return history


def system_widgets(prefix: str):
    """The system prompt box and the template-default switch (Chat and Compare), filled from the
    chosen adapter's training."""
    text = gr.Textbox(label="System prompt", lines=2, placeholder="empty: none of your own",
                      elem_id=f"{prefix}-system")
    default = gr.Checkbox(value=True, label="Template's default system prompt where none is set",
                          elem_id=f"{prefix}-default-system")
    return text, default


def build(ui) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            ui.chatbot = gr.Chatbot(label="Chat", height=440, elem_id="chatbot", buttons=["copy"],
                                    placeholder="Pick a mode on the right, then say hello.")
            with gr.Row(equal_height=True):
                ui.chat_input = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=5,
                                           elem_id="chat-input", autofocus=False)
                ui.chat_send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="chat-send")
            with gr.Row():
                ui.chat_status = gr.Markdown(elem_id="chat-status")
            with gr.Row():
                ui.chat_undo = gr.Button("Undo last", size="sm")
                ui.chat_clear = gr.Button("Clear", size="sm")
                ui.chat_gguf = gr.Button("Export this model as GGUF", size="sm", elem_id="chat-gguf")
        with gr.Column(scale=2):
            ui.chat_model = gr.Dropdown(["default"], value=start_model(), allow_custom_value=True, label="Base model",
                                        info="the model the adapters were trained on")
            ui.chat_mode = gr.Radio(adapters.MODE_LABELS, value="base", label="Mode", elem_id="chat-mode",
                                    info="switch any time; the conversation stays")
            ui.chat_adapters = gr.Dropdown([], value=[], multiselect=True, label="Adapters", elem_id="chat-adapters")
            ui.chat_weights = gr.Textbox(label="Mix weights", placeholder="e.g. 0.7, 0.3 (empty: 1 each)")
            ui.chat_system, ui.chat_default_system = system_widgets("chat")
            with gr.Accordion("Generation settings", open=False):
                with gr.Row():
                    ui.chat_temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                    ui.chat_max_tokens = gr.Slider(8, 1024, value=200, step=8, label="Max new tokens")
                with gr.Row():
                    ui.chat_top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
                    ui.chat_top_k = gr.Number(value=0, precision=0, minimum=0, label="Top-k (0 = off)")
                with gr.Row():
                    ui.chat_rep = gr.Slider(1, 2, value=1.1, step=0.05, label="Repetition penalty")
                    ui.chat_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
    ui.chat_settings = [ui.chat_system, ui.chat_default_system, ui.chat_temperature, ui.chat_top_p, ui.chat_top_k, ui.chat_max_tokens,
                        ui.chat_rep, ui.chat_seed]


"""The studio page: builds the Blocks from the tab modules and connects their events.

Each tab module builds its own widgets into a shared namespace (``ui``) and keeps its callbacks as
plain functions; the connections live here because many of them cross tabs (the preview reads the
sequence length from the Model & LoRA tab, Start reads the dataset from the Data tab, ...).
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from lora_app.data import DEMO_DATASET
from lora_app.model_source import DEFAULT_MODEL_ID
from lora_app.ui import adapters, chat_tab, compare_tab, data_tab, judge, model_tab, planner, runs_tab, train_tab
from lora_app.training.store import default_root
from lora_app.ui.common import browser_secret, friendly, run_store
from lora_app.ui.space import device_summary
from lora_app.ui.data_tab import datasets_dir
from lora_app.ui.form import FIELDS, start_model

CSS = (Path(__file__).with_name("style.css")).read_text()
THEME = gr.themes.Soft(primary_hue="indigo", radius_size="md")


def header_markdown() -> str:
    model = start_model()
    fallback = (f"<span>model: <code>{model}</code> from the Hub (the embedded copy is not installed here)</span>"
                if model == DEFAULT_MODEL_ID else "")
    return (f"<div class='lora-header'><h1>LoRA Studio</h1>"
            f"<span>{device_summary()}</span><span>runs in <code>{default_root()}</code></span>{fallback}</div>")


def build_app() -> gr.Blocks:
    ui = SimpleNamespace(form={})
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.HTML(header_markdown(), elem_id="header")
        # the dataset and the form survive a reload and a restart of the studio: the browser keeps them
        ui.data_path = gr.BrowserState(None, storage_key="lora_studio_dataset", secret=browser_secret())
        ui.saved_form = gr.BrowserState(None, storage_key="lora_studio_form", secret=browser_secret())
        with gr.Tabs(elem_id="tabs") as ui.tabs:
            with gr.Tab("1 · Data", id="data"):
                data_tab.build(ui)
            with gr.Tab("2 · Model & LoRA", id="model"):
                model_tab.build(ui)
            with gr.Tab("3 · Train", id="train"):
                train_tab.build(ui)
            with gr.Tab("4 · Runs & adapters", id="runs") as ui.runs_tab:
                runs_tab.build(ui)
            with gr.Tab("5 · Chat", id="chat") as ui.chat_tab:
                chat_tab.build(ui)
            with gr.Tab("6 · Compare", id="compare") as ui.compare_tab:
                compare_tab.build(ui)
        wire(demo, ui)
    demo.ui = ui  # tests reach the widgets through this
    return demo


def wire(demo: gr.Blocks, ui) -> None:
    form = [ui.form[name] for name in FIELDS]
    f = ui.form

    # -- data --
    preview_inputs = [ui.data_path, *(f[name] for name in data_tab.PREVIEW_FIELDS)]
    preview_outputs = [ui.preview_status, ui.preview_html, ui.length_plot]
    preview = dict(fn=data_tab.preview, inputs=preview_inputs, outputs=preview_outputs, trigger_mode="always_last")
    dataset = [ui.data_path, ui.data_file, ui.data_status]
    form_view = [*form, ui.model_about]
    ui.data_file.upload(friendly(data_tab.on_upload), ui.data_file, [ui.data_path, ui.data_status]).then(**preview)
    ui.data_file.clear(lambda: (None, "No dataset yet.", "", "", None), None,
                       [ui.data_path, ui.data_status, ui.preview_status, ui.preview_html, ui.length_plot])
    ui.demo_button.click(friendly(data_tab.use_demo), None, dataset).then(**preview)
    # one chain, so the preview sees the restored settings; the dataset first, as it is quick, so that a
    # file uploaded while the form is restored is not replaced by the one chosen last time
    demo.load(friendly(data_tab.restore), ui.data_path, dataset).then(
        model_tab.restore_form, ui.saved_form, form_view).then(**dict(preview, fn=data_tab.preview_restored))
    gr.on([c.change for c in form], model_tab.remember_form, form, ui.saved_form, trigger_mode="always_last",
          show_progress="hidden")
    gr.on([f["data_format"].input, f["template"].input, f["train_on_prompt"].input, ui.mapping.submit, ui.mapping.blur,
           f["system_prompt"].submit, f["system_prompt"].blur, f["default_system_prompt"].input, f["seq_len"].blur,
           f["batching"].input, f["batch_size"].blur, f["val_fraction"].blur, f["model"].change], **preview)

    # -- model & LoRA --
    # a model picked by hand (restored or loaded settings bring their own target modules)
    f["model"].input(model_tab.inspect_model, f["model"], [f["targets"], ui.model_about])
    gr.on([f["rank"].change, f["alpha"].change, f["variant"].change], model_tab.alpha_ratio,
          [f["rank"], f["alpha"], f["variant"]], ui.alpha_ratio, show_progress="hidden")
    gr.on([c.change for c in form] + [ui.data_path.change, demo.load], model_tab.summarize, [ui.data_path, *form],
          [ui.estimate, ui.cli, ui.train_summary], trigger_mode="always_last", show_progress="hidden")
    ui.save_config.click(model_tab.save_config, [ui.data_path, *form], ui.saved_config).then(
        lambda: gr.update(visible=True), None, ui.saved_config)
    ui.config_file.upload(model_tab.load_config_file, ui.config_file, [*form_view, ui.config_status])

    # -- train --
    ui.start.click(friendly(train_tab.start_run), [ui.run_name, ui.data_path, *form], [ui.train_status, ui.watch],
                   trigger_mode="once", concurrency_limit=1, concurrency_id="start")
    ui.cancel.click(friendly(train_tab.cancel_run), ui.watch, ui.train_status)
    ui.resume.click(friendly(train_tab.resume_run), ui.watch, ui.train_status, concurrency_id="start")
    ui.plan_run.click(friendly(planner.make_plan), [ui.data_path, *form],
                      [ui.plan_result, ui.plan_pick, ui.plan_alternatives], concurrency_limit=1, concurrency_id="start")
    ui.plan_pick.input(friendly(planner.use_alternative), [ui.plan_pick, ui.plan_alternatives, ui.data_path, *form],
                       [*form_view, ui.train_status])
    ui.sweep_start.click(friendly(train_tab.start_sweep), [ui.run_name, ui.sweep_grid, ui.data_path, *form],
                         [ui.train_status, ui.watch, ui.runs_overlay], concurrency_limit=1, concurrency_id="start")
    poll = dict(fn=train_tab.poll, inputs=[ui.watch, ui.smoothing, ui.log_scale, ui.seen],
                outputs=[ui.progress, ui.loss_plot, ui.lr_plot, ui.grad_plot, ui.mem_plot, ui.queue, ui.log, ui.watch,
                         ui.seen], show_progress="hidden", concurrency_limit=None)
    ui.timer.tick(**poll)
    gr.on([ui.watch.input, ui.smoothing.release, ui.log_scale.input], **poll)
    demo.load(friendly(train_tab.on_load), None, ui.watch).then(**poll)  # the live view at once, not a tick later

    # -- runs & adapters --
    runs_view = [ui.runs_table, ui.runs_pick, ui.runs_other, ui.runs_details, ui.runs_overlay, ui.overlay_chart,
                 ui.overlay_table]
    judge_view = dict(fn=friendly(judge.view), inputs=[ui.runs_pick, ui.runs_other],
                      outputs=[ui.probe_timeline, ui.probe_chart, ui.rating_chart, ui.promote_step, ui.promote_note])
    refresh_runs = dict(fn=friendly(runs_tab.refresh), inputs=[ui.runs_pick, ui.runs_other, ui.runs_overlay],
                        outputs=runs_view)
    gr.on([ui.runs_tab.select, ui.runs_refresh.click], **refresh_runs).then(**judge_view)
    gr.on([ui.runs_pick.input, ui.runs_other.input], friendly(runs_tab.run_details), [ui.runs_pick, ui.runs_other],
          ui.runs_details).then(**judge_view)
    ui.vote_next.click(friendly(judge.draw_pair), [ui.runs_pick, ui.runs_other], [ui.vote_pair, ui.vote_state])
    for button, winner in ((ui.vote_a, "a"), (ui.vote_tie, "tie"), (ui.vote_b, "b")):
        button.click(friendly(functools.partial(judge.vote, winner=winner)),
                     [ui.vote_state, ui.runs_pick, ui.runs_other],
                     [ui.vote_status, ui.probe_timeline, ui.rating_chart, ui.vote_pair, ui.vote_state])
    ui.promote.click(friendly(judge.promote), [ui.runs_pick, ui.promote_step], [ui.promote_note, ui.probe_timeline])
    ui.runs_overlay.input(friendly(runs_tab.overlay), ui.runs_overlay, [ui.overlay_chart, ui.overlay_table])
    ui.runs_compare.click(friendly(runs_tab.compare_runs), ui.runs_overlay,
                          [ui.tabs, ui.chat_model, ui.cmp_adapters, ui.cmp_out])
    ui.runs_chat.click(friendly(chat_with_run), ui.runs_pick, [ui.tabs, ui.chat_model, ui.chat_mode, ui.chat_adapters,
                                                               ui.chat_system, ui.chat_default_system, ui.chat_status])
    ui.runs_load.click(friendly(runs_tab.load_settings), ui.runs_pick, [*form_view, *dataset, ui.tabs, ui.config_status]
                       ).then(**preview)
    ui.runs_zip.click(friendly(runs_tab.zip_run), ui.runs_pick, ui.runs_file).then(
        lambda: gr.update(visible=True), None, ui.runs_file)
    ui.runs_merge.click(friendly(runs_tab.export_merged), ui.runs_pick, ui.runs_status)
    ui.runs_publish.click(friendly(runs_tab.publish), [ui.runs_pick, ui.runs_space_repo], ui.runs_status)
    ui.runs_gguf.click(friendly(runs_tab.export_gguf), [ui.runs_pick, ui.runs_gguf_type], ui.runs_status)
    ui.runs_delete.click(friendly(runs_tab.ask_delete), ui.runs_pick, [ui.runs_confirm_row, ui.runs_status])
    ui.runs_keep.click(lambda: (gr.update(visible=False), ""), None, [ui.runs_confirm_row, ui.runs_status])
    ui.runs_confirm.click(lambda: gr.update(visible=False), None, ui.runs_confirm_row).then(
        friendly(runs_tab.delete_run), ui.runs_pick, ui.runs_status).then(**refresh_runs)
    ui.adapter_upload.upload(friendly(runs_tab.upload_adapter), [ui.adapter_upload, ui.chat_model], ui.runs_status)

    # -- chat and compare --
    refresh_chat = dict(fn=friendly(chat_tab.refresh_adapters), inputs=[ui.chat_model, ui.chat_adapters],
                        outputs=ui.chat_adapters, show_progress="hidden")
    refresh_compare = dict(fn=friendly(chat_tab.refresh_adapters), inputs=[ui.chat_model, ui.cmp_adapters],
                           outputs=ui.cmp_adapters, show_progress="hidden")
    gr.on([ui.chat_tab.select, ui.chat_model.input], **refresh_chat)
    gr.on([ui.compare_tab.select, ui.chat_model.input], **refresh_compare)
    # adapters picked by hand bring the system prompt they were trained with (as "Chat with" does)
    ui.chat_adapters.input(friendly(chat_tab.trained_system), ui.chat_adapters,
                           [ui.chat_system, ui.chat_default_system, ui.chat_status], show_progress="hidden")
    ui.cmp_adapters.input(friendly(chat_tab.trained_system), ui.cmp_adapters,
                          [ui.cmp_system, ui.cmp_default_system, ui.cmp_note], show_progress="hidden")
    chat_inputs = [ui.chat_input, ui.chatbot, ui.chat_model, ui.chat_mode, ui.chat_adapters, ui.chat_weights,
                   *ui.chat_settings]
    gr.on([ui.chat_send.click, ui.chat_input.submit], chat_tab.respond, chat_inputs,
          [ui.chatbot, ui.chat_input, ui.chat_status], concurrency_id="generate", concurrency_limit=2)
    ui.chat_undo.click(chat_tab.undo, ui.chatbot, ui.chatbot)
    ui.chat_gguf.click(friendly(chat_tab.export_gguf), [ui.chat_model, ui.chat_mode, ui.chat_adapters, ui.chat_weights],
                       ui.chat_status, concurrency_id="generate")
    ui.chat_clear.click(lambda: ([], ""), None, [ui.chatbot, ui.chat_status])
    ui.cmp_run.click(friendly(compare_tab.run_compare),
                     [ui.cmp_prompt, ui.chat_model, ui.cmp_adapters, ui.cmp_base, ui.cmp_mix, ui.cmp_system,
                      ui.cmp_default_system, ui.cmp_temperature, ui.cmp_max_tokens, ui.cmp_seed], ui.cmp_out,
                     concurrency_id="generate", concurrency_limit=2)


def chat_with_run(run_id):
    """From the Runs tab to the Chat tab, with the run's base model and adapter selected, and the
    system prompt it was trained with."""
    if not run_id:
        raise gr.Error("Pick a run first.")
    run = run_store().get(run_id)
    if not run.adapter_path.is_dir():
        raise gr.Error(f"Run {run.name} has no final adapter yet (it is {run.status}).")
    model = run.config.get("model") or "default"
    choices = adapters.adapter_choices(model)
    system, said = adapters.trained_system([f"run:{run.id}"])
    return (gr.update(selected="chat"), model, "adapter", gr.update(choices=choices, value=[f"run:{run.id}"]),
            system.text or "", system.use_default, f"Chatting with **{run.name}**: send a message. {said}".strip())


def launch(demo: gr.Blocks | None = None, **kwargs):
    """Start the server (theme and CSS are launch options in Gradio 6)."""
    demo = demo or build_app()
    demo.queue(default_concurrency_limit=4)
    # the upload box shows the dataset in use: stored uploads and the demo file may be served
    allowed = [str(datasets_dir()), str(DEMO_DATASET.parent)]
    return demo.launch(theme=THEME, css=CSS, allowed_paths=allowed, **kwargs)

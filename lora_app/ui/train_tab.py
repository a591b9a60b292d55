"""Train tab: start, cancel and resume runs, and watch them live.

Nothing about a run lives in this process: the worker writes its status and metrics to the run store
and every page polls the store (a ``gr.Timer``), so a reloaded page, a second browser or a restarted
UI all re-attach to the same job. One job trains per device; the worker queues the rest.
"""

from __future__ import annotations

import html
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import gradio as gr

from lora_app.ui import charts, planner
from lora_app.errors import SettingsError, UserError
from lora_app.training import sweep, worker
from lora_app.training.trainer import preflight
from lora_app.ui.common import explain, fmt_seconds, run_store
from lora_app.ui.data_tab import dataset_label
from lora_app.ui.form import FIELDS, config_from_values, default_config, form_values, widget

POLL_SECONDS = 2.0
DUPLICATE_WINDOW = 5.0  # seconds in which an identical Start counts as the same click

_submit_lock = threading.Lock()
_recent: dict[str, tuple[float, str]] = {}  # config fingerprint -> (when, run id)


def run_label(run) -> str:
    return f"{run.name} · {run.status}"


def run_choices(runs) -> list[tuple[str, str]]:
    return [(run_label(r), r.id) for r in runs]


def default_run(runs):
    """The run a fresh page should show: the running one, else the next queued, else the newest."""
    for status in ("running", "queued"):
        active = [r for r in runs if r.status == status]
        if active:
            return min(active, key=lambda r: r.created) if status == "queued" else active[0]
    return runs[0] if runs else None


def start_run(name, data_path, *values):
    """Submit a run; (status markdown, watched-run dropdown update). Double clicks start one run.
    Problems with the settings come back as the status text (all of them at once), not as a toast."""
    try:
        return _start(name, data_path, values)
    except SettingsError as err:
        return "**Cannot start training:**\n\n" + "\n".join(f"- {p}" for p in err.problems.values()), gr.skip()
    except UserError as err:
        return f"**Cannot start training:**\n\n{err}", gr.skip()


def _start(name, data_path, values):
    if not data_path:
        raise UserError("Choose a dataset first: upload one in the Data tab, or use the demo dataset.")
    config = config_from_values(dict(zip(FIELDS, values)))
    config.data = data_path
    name = (name or "").strip() or default_name(config)
    fingerprint = json.dumps({**config.to_dict(), "name": name}, sort_keys=True, default=str)
    store = run_store()
    with _submit_lock:  # the check and the submit are one step, or two quick clicks both get through
        now = time.time()
        seen = _recent.get(fingerprint)
        if seen and now - seen[0] < DUPLICATE_WINDOW:
            run = store.get(seen[1])
            return f"Run **{run.name}** was just started; not starting it twice.", _watch(store, run.id)
        run = worker.submit(config, store, name=name)
        planner.keep_with(config, run)
        _recent.clear()
        _recent[fingerprint] = (now, run.id)
    where = "It starts when the current job ends." if run.status == "queued" and _busy(store, run) else ""
    return f"Started **{run.name}**. {where}".strip(), _watch(store, run.id)


def start_sweep(name, grid_text, data_path, *values):
    """Queue one run per combination of the grid (e.g. "rank=8,16; alpha=16,32") on the form's
    settings: (status, watched-run dropdown, the Runs tab's overlay selection). Every run is checked
    before the first is queued, so a mistake queues nothing."""
    try:
        if not data_path:
            raise UserError("Choose a dataset first: upload one in the Data tab, or use the demo dataset.")
        config = config_from_values(dict(zip(FIELDS, values)))
        config.data = data_path
        plan = sweep.expand(config, sweep.parse_grid(grid_text or ""))
        # each run gets a folder of its own in the store when it is queued; checked as one would be
        fresh = str(run_store().root / "a-new-run")
        sweep.check_all([(label, replace(each, output=fresh)) for label, each in plan], preflight)
    except SettingsError as err:
        return "**Cannot queue the sweep:**\n\n" + "\n".join(f"- {p}" for p in err.problems.values()), gr.skip(), \
            gr.skip()
    except UserError as err:
        return f"**Cannot queue the sweep:**\n\n{err}", gr.skip(), gr.skip()
    store = run_store()
    stem = (name or "").strip() or default_name(config)
    runs = [worker.submit(each, store, name=f"{stem}-{label}") for label, each in plan]
    ids = [r.id for r in runs]
    listing = run_choices(store.list())
    return (f"Queued a sweep of {len(runs)} runs: {', '.join(r.name for r in runs)}. They train one after another; "
            "the Runs tab overlays their curves.", gr.update(choices=listing, value=ids[0]),
            gr.update(choices=listing, value=ids))


def default_name(config) -> str:
    """A readable run name: dataset, variant and rank, and the time (stored datasets carry a hash prefix)."""
    stem = Path(dataset_label(config.data)).stem
    return f"{stem}-{config.variant}-r{config.rank}-{time.strftime('%m%d-%H%M%S')}"


def _busy(store, run) -> bool:
    return any(r.status == "running" and r.device == run.device and r.id != run.id for r in store.list())


def _watch(store, run_id):
    return gr.update(choices=run_choices(store.list()), value=run_id)


def cancel_run(run_id):
    if not run_id:
        raise UserError("Pick a run to cancel.")
    before = run_store().get(run_id)
    if before.status not in ("queued", "running"):
        return f"**{before.name}** is {before.status}; there is nothing to cancel."
    run = worker.cancel(run_id, run_store())
    if run.status == "cancelled":
        return f"Cancelled **{run.name}** before it started."
    if run.status == "running":
        return f"Stopping **{run.name}**: it saves a checkpoint at the end of the current step, then stops."
    return f"**{run.name}** is {run.status}; there is nothing to cancel."


def resume_run(run_id):
    if not run_id:
        raise UserError("Pick a run to resume.")
    run = worker.resume(run_id, run_store())
    return f"Resuming **{run.name}** from its last checkpoint."


def progress_html(run, metrics: list[dict], device_busy: bool = False) -> str:
    """Status, a progress bar with step / ETA, and the latest numbers of ``run`` (``device_busy``:
    another job holds its device, so a queued run is waiting rather than starting)."""
    if run is None:
        return "<div class='lora-progress'>No runs yet: start one above.</div>"
    total = run.total_steps or (run.config or {}).get("max_steps") or 0
    # the store's step comes with the heartbeat (every few seconds); metrics and the summary are fresher
    step = max([run.step, (run.summary or {}).get("steps") or 0] + [m["step"] for m in metrics[-1:]])
    fraction = min(step / total, 1.0) if total else 0.0
    if run.status == "completed":
        fraction = 1.0
    last = next((m for m in reversed(metrics) if "loss" in m), {})
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    facts = [f"step {step}/{total or '?'}"]
    if run.status == "running":
        if last.get("eta") is not None:
            facts.append(f"ETA {fmt_seconds(last['eta'])}")
        elif run.phases:
            facts.append("ETA after the first step")
        if last.get("elapsed") is not None:
            facts.append(f"elapsed {fmt_seconds(last['elapsed'])}")
    elif run.summary and run.summary.get("wall_seconds") is not None:
        facts.append(f"took {fmt_seconds(run.summary['wall_seconds'])}")
    if last.get("loss") is not None:
        facts.append(f"loss {last['loss']:.4f}")
    if evals:
        facts.append(f"eval loss {evals[-1]:.4f}")
    if last.get("tokens_per_second"):
        facts.append(f"{last['tokens_per_second']:.0f} tokens/s")
    estimate = run.estimate or {}
    if estimate.get("precision"):
        facts.append(f"{estimate['precision']}: {estimate['precision_reason']}")
    if run.status == "queued":
        facts.append("waiting for the running job to finish" if device_busy else "starting…")
    if run.cancel_requested and run.status == "running":
        facts.append("stopping…")
    error = f"<pre class='lora-error'>{html.escape(run.error)}</pre>" if run.error and run.status == "failed" else ""
    note = f"<p>{html.escape(run.error)}</p>" if run.error and run.status == "cancelled" else ""
    return (f"<div class='lora-progress' data-status='{run.status}' data-step='{step}'>"
            f"<div class='lora-progress-head'><b>{html.escape(run.name)}</b>"
            f"<span class='lora-status lora-status-{run.status}'>{run.status}</span>"
            f"<span>{' · '.join(html.escape(f) for f in facts)}</span></div>"
            f"<div class='lora-bar'><div style='width:{fraction * 100:.1f}%'></div></div>"
            f"{phases_html(run)}{error}{note}</div>")


def phases_html(run, now: float | None = None) -> str:
    """What the job has been doing: each phase with its time (a phase entered again, as training is
    after each evaluation, adds up), the current one marked and with what it found so far."""
    if not run.phases:
        return ""
    now = now or time.time()
    active = run.status == "running"
    ends = [p["at"] for p in run.phases[1:]] + [now if active else (run.finished or run.phases[-1]["at"])]
    spent: dict[str, float] = {}
    for phase, end in zip(run.phases, ends):
        spent[phase["phase"]] = spent.get(phase["phase"], 0.0) + max(end - phase["at"], 0.0)
    current = run.phases[-1]
    items = []
    for name, seconds in spent.items():
        is_current = active and name == current["phase"]
        detail = f": {current['detail']}" if is_current and current["detail"] else ""
        items.append(f"<span data-phase='{html.escape(name)}' class='{'lora-phase-now' if is_current else ''}'>"
                     f"{html.escape(name + detail)} {fmt_seconds(seconds)}</span>")
    return f"<div class='lora-phases'>{' · '.join(items)}</div>"


def queue_rows(runs) -> list[list]:
    """The job queue: the running job, then queued ones in the order they will start."""
    running = [r for r in runs if r.status == "running"]
    queued = sorted((r for r in runs if r.status == "queued"), key=lambda r: r.created)
    rows = []
    for i, r in enumerate(running + queued):
        place = "training" if r.status == "running" else f"#{i + 1 - len(running)} in line"
        rows.append([r.name, place, r.device, f"{r.step}/{r.total_steps or '?'}", time.strftime("%H:%M:%S", time.localtime(r.created))])
    return rows


def poll(run_id, smoothing, log_scale, seen):
    """One tick of the live view: (progress, loss, lr, grad norm, memory, queue, log, run picker, seen).

    Charts are redrawn only when the run has new metrics or the chart options changed (``seen`` holds
    what the page already shows), so an idle page costs one small database read per tick. A failing
    tick (say, the disk is full) shows its reason in the progress box: a toast every two seconds
    would bury the page.
    """
    try:
        return _poll(run_id, smoothing, log_scale, seen)
    except Exception as err:
        message = html.escape(f"Cannot read the run store right now: {explain(err)}")
        return (f"<div class='lora-progress'>{message}</div>", *[gr.skip()] * 7, {})


def _poll(run_id, smoothing, log_scale, seen):
    store = run_store()
    runs = worker.refresh(store)  # the watchdog: marks jobs whose process died or stopped beating
    by_id = {r.id: r for r in runs}
    run = by_id.get(run_id) if run_id else None
    if run is None and not run_id:
        run = default_run(runs)
    listing = [(r.id, r.status) for r in runs]
    metrics = store.metrics(run.id) if run else []
    key = [run.id if run else None, run.status if run else None, run.step if run else None, len(metrics),
           float(smoothing or 0), bool(log_scale)]
    seen = seen or {}
    picker = gr.update(choices=run_choices(runs), value=run.id if run else None) \
        if listing != seen.get("listing") or (run and run.id != run_id) else gr.skip()
    queue = queue_rows(runs)
    queue_out = queue if queue != seen.get("queue") else gr.skip()
    if key == seen.get("key"):
        figures = [gr.skip()] * 4
        log_out = gr.skip()
    else:
        figures = figures_for(run, metrics, smoothing, log_scale)
        log_out = worker.log_tail(run, 40) if run else ""
    new_seen = {"listing": listing, "queue": queue, "key": key}
    busy = bool(run) and any(r.status == "running" and r.device == run.device and r.id != run.id for r in runs)
    return (progress_html(run, metrics, busy), *figures, queue_out, log_out, picker, new_seen)


def figures_for(run, metrics, smoothing=0.6, log_scale=False):
    estimate = (run.estimate or {}).get("total_bytes") if run else None
    return [charts.loss_figure(metrics, smoothing, log_scale),
            charts.line_figure(metrics, "lr", "Learning rate", charts.COLORS["lr"]),
            charts.line_figure(metrics, "grad_norm", "Gradient norm", charts.COLORS["grad"], log_scale),
            charts.memory_figure(metrics, estimate, planner.planned_peak(run))]


def on_load():
    """A fresh page (or a reload) watches the active run, re-attaching to a job started earlier."""
    runs = run_store().list()
    run = default_run(runs)
    return gr.update(choices=run_choices(runs), value=run.id if run else None)


def build(ui) -> None:
    ui.train_summary = gr.Markdown(elem_id="train-summary")
    with gr.Row(elem_classes="lora-start-row"):
        ui.run_name = gr.Textbox(placeholder="Run name (optional)", show_label=False, scale=3, container=False)
        ui.start = gr.Button("Start training", variant="primary", scale=1, elem_id="start-training")
        ui.cancel = gr.Button("Cancel", variant="stop", scale=1, elem_id="cancel-run")
        ui.resume = gr.Button("Resume", scale=1, elem_id="resume-run")
    with gr.Accordion("Probe prompts: watch the answers change as it trains", open=False, elem_id="probe-settings"):
        d = form_values(default_config())
        with gr.Row():
            ui.form["probe_prompts"] = widget("probe_prompts", d["probe_prompts"], scale=3, elem_id="probe-prompts")
            with gr.Column(scale=2):
                for name in ("probe_rows", "probe_tokens", "probe_budget"):
                    ui.form[name] = widget(name, d[name])
    with gr.Accordion("Sweep: queue a grid of runs", open=False, elem_id="sweep-settings"):
        with gr.Row(equal_height=True):
            ui.sweep_grid = gr.Textbox(label="Grid", placeholder="rank=8,16; alpha=16,32", scale=4,
                                       info="settings and their values, ';' between settings: one run per "
                                            "combination, each with the form's other settings",
                                       elem_id="sweep-grid")
            ui.sweep_start = gr.Button("Queue sweep", scale=1, elem_id="sweep-start")
    planner.build(ui)
    ui.train_status = gr.Markdown(elem_id="train-status")
    with gr.Row(equal_height=True):
        ui.watch = gr.Dropdown([], label="Watching run", scale=3, elem_id="watch-run")
        ui.smoothing = gr.Slider(0, 0.99, value=0.6, step=0.01, label="Loss smoothing", scale=2)
        ui.log_scale = gr.Checkbox(label="Log scale", scale=1)
    ui.progress = gr.HTML(progress_html(None, []), elem_id="run-progress")
    with gr.Row():
        ui.loss_plot = gr.Plot(label="Loss", elem_id="loss-chart", show_label=False)
        ui.lr_plot = gr.Plot(label="Learning rate", elem_id="lr-chart", show_label=False)
    with gr.Row():
        ui.grad_plot = gr.Plot(label="Gradient norm", elem_id="grad-chart", show_label=False)
        ui.mem_plot = gr.Plot(label="Memory", elem_id="memory-chart", show_label=False)
    with gr.Row():
        with gr.Column(scale=3):
            ui.queue = gr.Dataframe(headers=["run", "place", "device", "step", "queued at"], value=[],
                                    label="Queue (one job trains at a time)", interactive=False, elem_id="queue")
        with gr.Column(scale=4):
            ui.log = gr.Code(label="Log (last lines)", language=None, lines=8, max_lines=12, interactive=False)
    ui.seen = gr.State({})
    ui.timer = gr.Timer(POLL_SECONDS)

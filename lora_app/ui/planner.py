"""Train tab, Plan: what the run on the form needs, measured before it starts.

*Plan* runs ``python -m lora_app plan`` (a fresh process, as the worker's would be) on the form's
settings and dataset: a few of the run's steps, then the peak memory, the time, and a table of
alternatives that fit, each one click from becoming the form's settings. The plan is kept per
settings (``$LORA_APP_HOME/plans``); a run started with the same settings keeps it in its folder, and
its memory chart draws the plan's peak beside what the run then uses.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import gradio as gr

from lora_app.errors import UserError
from lora_app.paths import app_home
from lora_app.training.plan import Plan, gib, minutes
from lora_app.ui import model_tab
from lora_app.ui.common import run_store
from lora_app.ui.form import FIELDS, config_from_values

PLAN_TIMEOUT = 900  # seconds: a plan loads the model and trains a few steps
RUN_PLAN = "plan.json"  # in a run's folder


def plans_dir() -> Path:
    return app_home() / "plans"


def plan_file(config) -> Path:
    """Where the plan of these settings is kept (where the run lives does not change what it needs)."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("output", "resume")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return plans_dir() / f"{digest}.json"


def _config(data_path, values):
    if not data_path:
        raise UserError("Choose a dataset first: a plan trains a few steps of your own data.")
    config = config_from_values(dict(zip(FIELDS, values)))
    config.data = data_path
    return config


def make_plan(data_path, *values):
    """Measure the form's run: yields (the plan in words, the alternatives to pick from, the plan's
    alternatives), first a line saying it is being measured."""
    config = _config(data_path, values)
    busy = [r.name for r in run_store().list() if r.status == "running"]
    if busy:
        raise UserError(f"Run {busy[0]} is training: a plan measured now would share the machine with it. Plan "
                        "when it ends.")
    yield ("⏳ Measuring: loading the model and training a few of the run's steps on your data…",
           gr.update(choices=[], value=None), [])
    yield measured(config)


def measured(config):
    """``python -m lora_app plan`` on ``config``, in a process of its own: (words, choices, alternatives)."""
    target = plan_file(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lora-plan-") as scratch:
        settings = Path(scratch) / "settings.json"
        replace(config, output=None).write(settings)
        done = subprocess.run([sys.executable, "-m", "lora_app", "plan", "--config", str(settings), "--out",
                               str(target)], capture_output=True, text=True, timeout=PLAN_TIMEOUT,
                              cwd=Path(__file__).resolve().parents[2])
    if done.returncode:
        said = next((line[len("error: "):] for line in done.stderr.splitlines() if line.startswith("error: ")),
                    done.stderr.strip()[-800:])
        raise UserError(f"The plan could not be measured: {said}")
    plan = Plan.load(target)
    choices = [(f"{alt['label']}: {gib(alt['peak_bytes'])}, {minutes(alt['seconds'])}", i)
               for i, alt in enumerate(plan.alternatives) if alt["fits"]]
    return plan_markdown(plan), gr.update(choices=choices, value=None), plan.alternatives


def plan_markdown(plan: Plan) -> str:
    difference = 100 * (plan.formula_bytes / plan.peak_bytes - 1)
    verdict = "✅ **It fits.**" if plan.fits else "❌ **It does not fit**: pick an alternative below."
    lines = [f"{verdict} Measured on the run's longest steps: peak **{gib(plan.peak_bytes)}** of "
             f"{gib(plan.available_bytes)} free (the formula's estimate was {gib(plan.formula_bytes)}, "
             f"{difference:+.0f} %) · training **{minutes(plan.train_seconds)}** for {plan.total_steps} steps, "
             f"after {plan.startup_seconds:.0f} s to start.", "",
             "| instead | peak memory | time | fits |", "|---|---|---|---|"]
    lines += [f"| {alt['label']} | {gib(alt['peak_bytes'])} | {minutes(alt['seconds'])} | "
              f"{'yes' if alt['fits'] else 'no'} |" for alt in plan.alternatives]
    return "\n".join(lines)


def use_alternative(choice, alternatives, data_path, *values):
    """The form with the chosen alternative's changes: one update per field, the model's description,
    and a status line."""
    if choice is None or not alternatives:
        raise UserError("Make a plan, then choose one of its alternatives.")
    alternative = alternatives[int(choice)]
    config = replace(config_from_values(dict(zip(FIELDS, values))), **alternative["changes"])
    return (*model_tab.form_updates(config), f"Settings changed to: {alternative['label']}. Plan again to measure "
                                             "them, or start training.")


def keep_with(config, run) -> None:
    """Put the plan of ``config`` (if one was made) in the run's folder, for its memory chart."""
    found = plan_file(config)
    if found.is_file():
        Path(run.output).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, Path(run.output) / RUN_PLAN)


def planned_peak(run) -> int | None:
    plan = Plan.load(Path(run.output) / RUN_PLAN) if run else None
    return plan.peak_bytes if plan else None


def build(ui) -> None:
    with gr.Accordion("Plan: will it fit, how long will it take (measured on a few real steps)", open=False,
                      elem_id="plan-settings"):
        with gr.Row(equal_height=True):
            ui.plan_run = gr.Button("Plan this run", scale=1, elem_id="plan-run")
            ui.plan_pick = gr.Dropdown([], label="Alternatives that fit: pick one to put it on the form", scale=3,
                                       elem_id="plan-pick")
        ui.plan_result = gr.Markdown(elem_id="plan-result")
        ui.plan_alternatives = gr.State([])

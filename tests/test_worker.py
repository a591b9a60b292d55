"""The run store and detached workers: queueing, kill -9 and resume, graceful cancel, the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import save_tiny
from lora_app import allocator
from lora_app.training.config import TrainConfig
from lora_app.training.store import RunStore
from lora_app.training import worker

ROWS = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(40)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    model = str(save_tiny("llama", root / "tiny-llama"))
    data = root / "data.json"
    data.write_text(json.dumps(ROWS))
    return root, model, str(data)


def wait_for(condition, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def job(model, data, **overrides):
    values = dict(model=model, data=data, rank=4, alpha=8, batch_size=2, seq_len=64, max_steps=2, lr=1e-3, warmup=0,
                  log_every=1)
    values.update(overrides)
    return TrainConfig(**values)


def test_claim_is_exclusive_and_first_come_first_served(tmp_path):
    store = RunStore(tmp_path)
    first = store.create_run({}, device="cpu")
    second = store.create_run({}, device="cpu")
    assert not store.claim(second.id, pid=2)  # the earlier run is first in line
    assert store.claim(first.id, pid=1)
    assert not store.claim(second.id, pid=2)  # the device is busy
    store.finish(first.id, "completed")
    assert store.claim(second.id, pid=2)
    store.log_metrics(second.id, 1, {"loss": 2.0})
    store.log_metrics(second.id, 2, {"loss": 1.5})
    store.truncate_metrics(second.id, 1)
    assert [m["step"] for m in store.metrics(second.id)] == [1]


def test_phases_are_recorded_in_order_and_old_stores_gain_them(tmp_path):
    import sqlite3

    from lora_app.ui.train_tab import phases_html

    store = RunStore(tmp_path / "new")
    run = store.create_run({}, device="cpu")
    store.enter_phase(run.id, "preparing data", "pirate.jsonl")
    store.enter_phase(run.id, "preparing data", "40 rows, 1,234 tokens")  # the same phase: what it found
    store.enter_phase(run.id, "loading model")
    phases = store.get(run.id).phases
    assert [(p["phase"], p["detail"]) for p in phases] == [("preparing data", "40 rows, 1,234 tokens"),
                                                          ("loading model", "")]
    store.claim(run.id, pid=1)
    shown = phases_html(store.get(run.id), now=phases[-1]["at"] + 3)
    assert shown.index("data-phase='preparing data'") < shown.index("data-phase='loading model'")
    assert "lora-phase-now'>loading model 3 s" in shown
    store.requeue(run.id)
    assert store.get(run.id).phases == []  # a resumed run starts its phases again

    old = tmp_path / "old"  # a store written before phases existed
    old.mkdir()
    db = sqlite3.connect(old / "runs.db")
    db.executescript(_SCHEMA_WITHOUT_PHASES)
    db.execute("INSERT INTO runs (id, name, output, status, created, config) VALUES ('r1', 'r', 'o', 'completed', 0, "
               "'{}')")
    db.commit()
    db.close()
    assert RunStore(old).get("r1").phases == []


_SCHEMA_WITHOUT_PHASES = """CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, output TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT 'cpu', status TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL,
    heartbeat REAL, pid INTEGER, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER,
    cancel_requested REAL NOT NULL DEFAULT 0, config TEXT NOT NULL, estimate TEXT, summary TEXT, error TEXT);"""


def test_queue_kill_dash_9_and_resume(setup):
    root, model, data = setup
    store = RunStore(root / "runs")
    long = worker.submit(job(model, data, max_steps=60, save_every=3), store, name="long")
    short = worker.submit(job(model, data, max_steps=2), store, name="short")
    wait_for(lambda: store.get(long.id).status == "running", what="the first job to start")
    assert store.get(short.id).status == "queued"  # one job per device; the second waits its turn

    checkpoints = root / "runs" / long.id / "checkpoints"
    wait_for(lambda: checkpoints.exists() and any(checkpoints.glob("checkpoint-*/state.json")), what="a checkpoint")
    os.killpg(store.get(long.id).pid, signal.SIGKILL)
    run = wait_for(lambda: next(r for r in worker.refresh(store) if r.id == long.id).status == "failed"
                   and store.get(long.id), what="the killed job to be marked failed")
    assert "ended unexpectedly" in run.error and "step" in run.error  # the log tail comes with it
    assert not (root / "runs" / long.id / "adapter").exists()  # never a half-written final adapter

    wait_for(lambda: store.get(short.id).status == "completed", what="the queued job to run")
    worker.resume(long.id, store)
    wait_for(lambda: store.get(long.id).status == "completed", timeout=240, what="the resumed job")
    steps = [m["step"] for m in store.metrics(long.id) if "loss" in m]
    assert steps == list(range(1, 61))  # one continuous curve: nothing lost, nothing logged twice
    assert (root / "runs" / long.id / "adapter" / "adapter_model.safetensors").exists()
    assert store.get(long.id).summary["steps"] == 60


def test_cancel_is_graceful(setup):
    root, model, data = setup
    store = RunStore(root / "cancel-runs")
    run = worker.submit(job(model, data, max_steps=100000), store)
    wait_for(lambda: store.get(run.id).step or len(store.metrics(run.id)) > 2, what="training to start")
    worker.cancel(run.id, store)
    done = wait_for(lambda: store.get(run.id).status == "cancelled" and store.get(run.id), what="the cancel")
    assert any((root / "cancel-runs" / run.id / "checkpoints").glob("checkpoint-*/state.json"))
    assert done.error is None


def test_cli_run_is_registered_and_refuses_to_overwrite(setup, tmp_path):
    root, model, data = setup
    output = tmp_path / "cli-run"
    command = [sys.executable, "-m", "lora_app", "train", "--model", model, "--data", data, "--output", str(output),
               "--max-steps", "1", "--batch-size", "2", "--seq-len", "64", "--store", str(tmp_path / "store")]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    # the command started itself again on jemalloc where the machine has it (.ci/run installs it)
    assert f"memory from {'jemalloc' if allocator.jemalloc() else 'the C library'}" in first.stdout
    (run,) = RunStore(tmp_path / "store").list()
    assert run.status == "completed" and run.summary["steps"] == 1
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 2 and "already holds a run" in second.stderr
    assert "Traceback" not in second.stderr


def queued_cli_run(model, data, output, store):
    """A CLI run queued behind another job, which holds the device until it is finished."""
    busy = store.create_run({}, output=str(output.parent / "other"))
    assert store.claim(busy.id, os.getpid())
    process = subprocess.Popen([sys.executable, "-m", "lora_app", "train", "--model", model, "--data", data,
                                "--output", str(output), "--max-steps", "100000", "--batch-size", "2", "--seq-len",
                                "64", "--store", str(store.root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(lambda: "queued" in process.stdout.readline(), what="the run to queue")
    return process, busy


def finish(process, timeout: float) -> tuple[str, str]:
    """The output of a process that should end by itself now; killed if it does not (100000 steps)."""
    try:
        return process.communicate(timeout=timeout)
    finally:
        process.kill()


def test_ctrl_c_while_queued_leaves_the_queue(setup, tmp_path):
    root, model, data = setup
    store = RunStore(tmp_path / "store")
    process, busy = queued_cli_run(model, data, tmp_path / "run", store)
    process.send_signal(signal.SIGINT)
    out, err = finish(process, timeout=60)
    assert process.returncode == 0 and "cancelled before it started" in out and "Traceback" not in err
    (run,) = [r for r in store.list() if r.id != busy.id]
    assert run.status == "cancelled" and run.error == "Cancelled before it started."


def test_ctrl_c_in_the_cli_stops_after_the_step_with_a_checkpoint(setup, tmp_path):
    root, model, data = setup
    output, store = tmp_path / "run", RunStore(tmp_path / "store")
    process, busy = queued_cli_run(model, data, output, store)
    store.finish(busy.id, "completed")
    try:
        wait_for(lambda: process.stdout.readline().startswith("step 2/"), what="training to start")
    finally:
        process.send_signal(signal.SIGINT)
    out, err = finish(process, timeout=120)
    assert process.returncode == 0, err
    assert "stopping after this step" in err and "Traceback" not in err
    (run,) = [r for r in store.list() if r.id != busy.id]
    assert run.status == "cancelled" and run.error is None
    step = run.summary["steps"]
    assert (output / "checkpoints" / f"checkpoint-{step}" / "state.json").exists()
    assert f"Continue it from checkpoint-{step} with: python -m lora_app train --output {output} --resume" in out


def test_a_second_ctrl_c_stops_at_once_and_ctrl_c_is_given_back(setup, tmp_path, monkeypatch, capfd):
    from lora_app.training import run as cli_run

    root, model, data = setup
    store = RunStore(tmp_path / "store")
    asked = []

    def interrupted_twice(config, callbacks, checked):
        signal.raise_signal(signal.SIGINT)  # the first: stop after the step
        asked.append(callbacks.should_stop())
        signal.raise_signal(signal.SIGINT)  # the second: at once
        raise AssertionError("the second Ctrl-C did not stop the run")

    monkeypatch.setattr(cli_run, "train", interrupted_twice)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    code = cli_run.start(job(model, data, output=str(tmp_path / "run")), store, None, as_json=False,
                         main_process=True)
    assert code == 130 and asked == [True]
    (run,) = store.list()
    assert run.status == "cancelled" and run.error == cli_run.INTERRUPTED
    assert "It saved no checkpoint: start it again with a new --output." in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again


def test_the_same_command_runs_data_parallel_under_torchrun(setup, tmp_path):
    root, model, data = setup
    command = ["torchrun", "--nproc_per_node", "2", "-m", "lora_app", "train", "--model", model, "--data", data,
               "--output", str(tmp_path / "ddp"), "--max-steps", "2", "--batch-size", "2", "--seq-len", "64",
               "--store", str(tmp_path / "store")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = RunStore(tmp_path / "store").list()  # one run, kept by the main process
    assert run.status == "completed" and run.summary["steps"] == 2
    losses = [line.split("loss=")[1].split()[0] for line in out.stdout.splitlines() if line.startswith("step 1/")]
    assert len(losses) == 2 and losses[0] != losses[1]  # each process trained on its own shard
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").exists()

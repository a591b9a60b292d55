"""Training jobs as detached processes that outlive the UI.

The UI (or anyone) calls :func:`submit`; it registers a queued run and starts
``python -m lora_app train --run-id ...`` in a session of its own, output to the run's
``train.log``. That process waits its turn (one running job per device, first come first served,
see ``RunStore.claim``), trains, and records everything in the run store. Nothing about a job lives
in the UI process, so closing the tab or restarting the UI loses nothing: the page reads the store.

:func:`refresh` is the watchdog the UI calls while it polls: a job whose process is gone or whose
heartbeat stopped is marked failed with the tail of its log, and a cancel that was not honoured in
time is enforced (SIGTERM, which the job also treats as a graceful cancel, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lora_app.errors import TrainingError
from lora_app.models import default_device
from lora_app.training.config import TrainConfig
from lora_app.training.store import HEARTBEAT_TIMEOUT, Run, RunStore
from lora_app.training.trainer import preflight

CANCEL_GRACE = 60.0  # seconds a running job gets to checkpoint and stop before SIGTERM
KILL_GRACE = 15.0    # and after SIGTERM, before SIGKILL


def submit(config: TrainConfig, store: RunStore | None = None, name: str | None = None) -> Run:
    """Check ``config``, register the run as queued and start its worker. A run that fails the checks
    (a ``UserError`` naming every problem) leaves nothing in the store."""
    store = store or RunStore()
    run_id = store.new_id()
    config.output = config.output or str(store.root / run_id)
    preflight(config)
    run = store.create_run(config.to_dict(), output=config.output, name=name, device=default_device(), run_id=run_id)
    _start(store, run)
    return store.get(run.id)


def resume(run_id: str, store: RunStore | None = None) -> Run:
    """Queue a stopped run again; it continues from its last checkpoint."""
    store = store or RunStore()
    run = store.get(run_id)
    if run.status in ("queued", "running"):
        raise TrainingError(f"Run {run.name} is {run.status}; only a stopped run can be resumed.")
    config = TrainConfig.from_dict({**run.config, "resume": True})
    preflight(config)  # says so when there is no checkpoint to resume from
    store.update(run_id, config=config.to_dict())
    store.requeue(run_id)
    _start(store, store.get(run_id))
    return store.get(run_id)


def _start(store: RunStore, run: Run) -> None:
    """The training process, detached, its output in the run's train.log; it reads its settings from the store."""
    Path(run.output).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lora_app", "train", "--run-id", run.id, "--store", str(store.root)]
    with open(run.log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=Path(__file__).resolve().parents[2],
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    store.update(run.id, pid=process.pid)
    store.enter_phase(run.id, "starting", "loading the training libraries")


def cancel(run_id: str, store: RunStore | None = None) -> Run:
    """A queued job is dropped at once; a running one checkpoints and stops at its next step."""
    store = store or RunStore()
    run = store.get(run_id)
    if run.status == "queued":
        store.drop(run_id)
        _signal(run.pid, signal.SIGTERM)
    elif run.status == "running" and not run.cancel_requested:
        store.update(run_id, cancel_requested=time.time())
    return store.get(run_id)


def refresh(store: RunStore | None = None) -> list[Run]:
    """Enforce the rules on jobs that stopped answering; returns all runs, newest first."""
    store = store or RunStore()
    now = time.time()
    for run in store.list():
        if run.status != "running":
            continue
        alive = _alive(run.pid)
        if not alive:
            store.finish(run.id, "cancelled" if run.cancel_requested else "failed",
                         error=None if run.cancel_requested else "The training process ended unexpectedly.\n" + log_tail(run))
        elif run.heartbeat and now - run.heartbeat > HEARTBEAT_TIMEOUT:
            _kill(run.pid)
            store.finish(run.id, "failed", error=f"No heartbeat for {now - run.heartbeat:.0f} s; the job was stopped.\n"
                         + log_tail(run))
        elif run.cancel_requested and now - run.cancel_requested > CANCEL_GRACE + KILL_GRACE:
            _kill(run.pid)
            store.finish(run.id, "cancelled", error="Stopped by force: it did not stop in time.")
        elif run.cancel_requested and now - run.cancel_requested > CANCEL_GRACE:
            _signal(run.pid, signal.SIGTERM)
    return store.list()


def log_tail(run: Run, lines: int = 30) -> str:
    try:
        text = run.log_path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # reap our own child, or it lingers as a zombie
        if finished:
            return False
    except ChildProcessError:
        pass  # not our child (started by an earlier UI process or from a shell)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie that is not ours to reap is dead all the same
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _signal(pid: int | None, sig: int) -> None:
    if pid:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _kill(pid: int | None) -> None:
    _signal(pid, signal.SIGKILL)

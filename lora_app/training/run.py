"""One training run from the command line: waiting for the device, the console and ``train.log``,
the heartbeat, and the store's record of how it ended. ``cli.py`` parses and checks; this runs.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from lora_app.errors import UserError
from lora_app.models import default_device
from lora_app.training.config import TrainConfig
from lora_app.training.preflight import latest_checkpoint
from lora_app.training.trainer import Callbacks, Checked, preflight, train

HEARTBEAT_EVERY = 5.0

INTERRUPT_NOTICE = "Ctrl-C: stopping after this step, with a checkpoint to resume from (Ctrl-C again: stop at once)"
INTERRUPTED = "Stopped at once by Ctrl-C."
OOM_ADVICE = ("Out of memory. Try a smaller batch size or sequence length (use --grad-accum to keep the effective "
              "batch), 4-bit quantization (--quantization 4bit), or --gradient-checkpointing.")


def start(config: TrainConfig, store, run_id: str | None, *, as_json: bool, main_process: bool) -> int:
    """Check what needs the model's config and tokenizer, register the run in ``store`` (or take the
    one the studio registered as ``run_id``), and train it. Returns the exit code."""
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar: noise between our own lines
    if run_id is not None:  # the worker checked this run, and sends this process's output to train.log
        return _run(config, store, run_id, Console(None, as_json=False))
    checked = preflight(config)
    console = Console(Path(config.output) / "train.log" if main_process else None, as_json=as_json)
    if store is None:  # only the main process of a multi-process run keeps the books
        return _run(config, None, None, console, checked)
    existing = store.find_by_output(config.output) if config.resume else None
    if existing is not None:
        store.update(existing.id, config=config.to_dict())
        store.requeue(existing.id)
        run_id = existing.id
    else:
        run_id = store.create_run(config.to_dict(), output=config.output, device=default_device()).id
    return _run(config, store, run_id, console, checked)


def _wait_for_turn(store, run_id: str, stop: threading.Event) -> bool:
    """Block until this run holds the device; False when it was cancelled while queued."""
    told = False
    while not store.claim(run_id, os.getpid()):
        run = store.get(run_id)
        if run.status != "queued":
            return False
        if stop.is_set():
            store.drop(run_id)
            return False
        if not told:
            print("queued: another training job is using the device; this one starts when it ends", flush=True)
            told = True
        time.sleep(1.0)
    return True


def _run(config: TrainConfig, store, run_id: str | None, console: Console, checked: Checked | None = None) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # SIGTERM = graceful cancel: checkpoint, then exit
    # Ctrl-C too, as the studio's Cancel does; not where the caller handles it (a sweep) or ignores it
    interrupt = signal.getsignal(signal.SIGINT)
    if interrupt is signal.default_int_handler:
        signal.signal(signal.SIGINT, functools.partial(_interrupted, stop))
    try:
        return _train_and_record(config, store, run_id, console, checked, stop)
    finally:
        signal.signal(signal.SIGINT, interrupt)


def _interrupted(stop: threading.Event, *_) -> None:
    """The first Ctrl-C stops the run after its step, with a checkpoint; the second at once."""
    if stop.is_set():
        raise KeyboardInterrupt
    stop.set()
    # a raw write: the interrupted code may be in the middle of a print to the same stream
    os.write(2, f"\n{INTERRUPT_NOTICE}\n".encode())


def _train_and_record(config: TrainConfig, store, run_id: str | None, console: Console, checked: Checked | None,
                      stop: threading.Event) -> int:
    if store is not None and not _wait_for_turn(store, run_id, stop):
        console.say("cancelled before it started")
        return 0
    done = threading.Event()
    callbacks = _callbacks(config, store, run_id, stop, done, console)
    status, error, summary, code = "failed", None, None, 1
    try:
        outcome = train(config, callbacks, checked)
        status, summary, code = outcome.status, outcome.summary, 0
        console.finish(status, summary, config.output)
    except KeyboardInterrupt:
        status, error, code = "cancelled", INTERRUPTED, 130
        console.error(f"{error} {_how_to_continue(config.output)}")
    except Exception as err:
        error = explain(err)
        code = 2 if isinstance(err, UserError) else 1  # bad input, found during the work, is still bad input
        console.error(error)
        if not isinstance(err, UserError):
            traceback.print_exc()
    finally:
        done.set()
        console.close()
        if store is not None:
            if summary is not None:
                store.update(run_id, step=summary["steps"])
            store.finish(run_id, status, error=error, summary=summary)
    return code


class Console:
    """What a run tells its user: lines to the console and to the run's ``train.log``; on a terminal,
    steps show as a progress bar with loss, tokens/s and ETA instead of a line each."""

    def __init__(self, log_path: Path | None, as_json: bool):
        self.log = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = open(log_path, "a", buffering=1)
        self.as_json, self.bar = as_json, None
        self.began, self.phases = time.monotonic(), set()

    def say(self, text: str, console: bool = True) -> None:
        if console and self.bar is not None:
            self.bar.write(text)
        elif console:
            print(text, flush=True)
        if self.log:
            self.log.write(text + "\n")

    def step(self, step: int, total: int, values: dict) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if k in STEP_VALUES)
        line = f"step {step}/{total} {shown}"
        if not sys.stdout.isatty():
            self.say(line)
            return
        if self.bar is None:
            # a terminal that reports no width (some consoles) still gets a bar of the default width
            self.bar = tqdm(total=total, initial=step - 1, unit="step", ncols=shutil.get_terminal_size().columns)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(" ".join(f"{k} {values[k]:.4g}" for k in ("loss", "eval_loss") if k in values)
                                 + (f" {values['tokens_per_second']:.0f} tok/s" if "tokens_per_second" in values else ""))
        self.say(line, console=False)

    def phase(self, phase: str, detail: str) -> None:
        """A line per phase the run enters, with the time since it began (training back from an
        evaluation or a checkpoint needs no line of its own)."""
        if phase == "training" and phase in self.phases:
            return
        self.phases.add(phase)
        self.say(f"[{time.monotonic() - self.began:6.1f} s] {phase}" + (f": {detail}" if detail else ""))

    def finish(self, status: str, summary: dict, output: str) -> None:
        self.close_bar()
        if self.as_json:
            print(json.dumps(summary, default=str), flush=True)
        for line in summary_lines(status, summary, output):
            self.say(line, console=not self.as_json)

    def error(self, text: str) -> None:
        self.close_bar()
        print(f"error: {text}", file=sys.stderr, flush=True)
        if self.log:
            self.log.write(f"error: {text}\n")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.log:
            self.log.close()


STEP_VALUES = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_second")


def summary_lines(status: str, s: dict, output: str) -> list[str]:
    """A finished run in a few lines: where the adapter is, the losses, the time and the memory."""
    losses = f"final loss {s['final_loss']:.4f}" if s.get("final_loss") is not None else "no loss"
    if s.get("eval_loss") is not None:
        losses += f", eval loss {s['eval_loss']:.4f}"
    lines = [f"{status}: {s['steps']} of {s['total_steps']} steps in {s['wall_seconds']:.0f} s "
             f"({s['useful_tokens_per_second']:.0f} tokens/s, {s['precision']} on {s['device']}); {losses}",
             f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB (estimated {s['memory_estimate_bytes'] / 2**30:.2f})"]
    if s.get("probe_seconds"):
        lines.append(f"probe answers took {s['probe_seconds']:.1f} s "
                     f"({100 * s['probe_seconds'] / max(s['wall_seconds'], 1e-9):.1f} % of the run)")
    if status == "completed":
        lines.append(f"adapter: {Path(output) / 'adapter'}")
    elif status == "cancelled":
        lines.append(_how_to_continue(output))
    return lines


def _how_to_continue(output: str) -> str:
    """How to go on with a run that stopped before its end."""
    checkpoint = latest_checkpoint(Path(output))
    if checkpoint is None:
        return "It saved no checkpoint: start it again with a new --output."
    return f"Continue it from {checkpoint.name} with: python -m lora_app train --output {output} --resume"


def _callbacks(config: TrainConfig, store, run_id, stop: threading.Event, done: threading.Event,
               console: Console) -> Callbacks:
    """Progress to the console, the run folder's metrics.jsonl and the store; cancels from the store."""
    progress = {"step": None, "total": None}
    metrics_file = Path(config.output) / "metrics.jsonl"

    def beat():
        while not done.wait(HEARTBEAT_EVERY):
            if store.heartbeat(run_id, progress["step"], progress["total"]):
                stop.set()

    def on_start(info: dict) -> None:
        progress.update(step=info["start_step"], total=info["total_steps"])
        if store is not None:
            store.truncate_metrics(run_id, info["start_step"])
            store.update(run_id, total_steps=info["total_steps"], step=info["start_step"], estimate=info["estimate"])
            threading.Thread(target=beat, daemon=True).start()

    def on_log(step: int, values: dict) -> None:
        progress["step"] = step
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if store is not None:
            store.log_metrics(run_id, step, values)
        console.step(step, progress["total"], values)

    def on_phase(phase: str, detail: str) -> None:
        if store is not None:
            store.enter_phase(run_id, phase, detail)
        console.phase(phase, detail)

    def on_probes(step: int, answers: list[dict]) -> None:
        with open(Path(config.output) / "probes.jsonl", "a") as f:
            f.writelines(json.dumps({"step": step, **answer}) + "\n" for answer in answers)
        if store is not None:
            store.log_probes(run_id, step, answers)
        scores = [a["score"] for a in answers if a["score"] is not None]
        console.say(f"probes at step {step}: {len(answers)} answers in {sum(a['seconds'] for a in answers):.1f} s"
                    + (f", mean token F1 {sum(scores) / len(scores):.3f}" if scores else ""))

    def on_event(step: int, text: str) -> None:
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"step": step, "event": text}) + "\n")
        if store is not None:
            store.log_metrics(run_id, step, {"event": text})
        console.say(f"step {step}: {text}")

    return Callbacks(on_start=on_start, on_log=on_log, should_stop=stop.is_set, log=console.say, on_phase=on_phase,
                     on_probes=on_probes, on_event=on_event)


def explain(err: Exception) -> str:
    """The one line a failed run reports: its own words for a UserError, advice for out-of-memory."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return OOM_ADVICE
    if isinstance(err, UserError):
        return str(err)
    return f"Training failed: {type(err).__name__}: {err}"

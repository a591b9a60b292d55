"""`python -m lora_app train`: one training run, registered in the run store.

Settings come from the TrainConfig defaults, then ``--config`` (YAML/JSON, the same keys), then the
flags given on the command line. The run waits its turn for the device (another job may be running),
trains with a heartbeat, and leaves its status, metrics and summary in the store, whether it was
started from a shell or by the UI (``--run-id``). Exit codes: 0 done or cancelled, 1 failed, 2 bad
settings.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import fields
from pathlib import Path

from lora_app.training.config import PRECISIONS, QUANTIZATIONS, SCHEDULERS, TrainConfig, TrainConfigError

HEARTBEAT_EVERY = 5.0

OOM_ADVICE = ("Out of memory. Try a smaller batch size or sequence length (use --grad-accum to keep the effective "
              "batch), 4-bit quantization (--quantization 4bit), or --gradient-checkpointing.")


def parser() -> argparse.ArgumentParser:
    from lora_app.lora.config import VARIANTS

    p = argparse.ArgumentParser(prog="python -m lora_app train", description="Train a LoRA adapter.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML or JSON file with the same keys as these flags")
    p.add_argument("--model", help="'default' (the embedded SmolLM2-135M-Instruct), a hub id or a local folder")
    p.add_argument("--data", help="training data file or folder")
    p.add_argument("--val-data", help="validation data file (instead of --val-fraction)")
    p.add_argument("--data-format", help="override format detection: alpaca, sharegpt, openai, prompt_completion, text")
    p.add_argument("--data-mapping", type=_mapping, help="map columns by hand: field=column,field=column "
                   "(e.g. instruction=question,output=answer)")
    p.add_argument("--template", help="chat template: auto, tokenizer, alpaca, chatml")
    p.add_argument("--train-on-prompt", action="store_true")
    p.add_argument("--output", help="run folder (never overwritten; use --resume to continue one)")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--targets", help="comma list of module names, a regex, or all-linear")
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--lora-plus-ratio", type=float)
    p.add_argument("--delta-lambda", type=float)
    p.add_argument("--quantization", choices=QUANTIZATIONS)
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--max-batch-tokens", type=int, help="cap on padded tokens per micro-batch (0: none; "
                   "default: 2048 on a CPU, none on a GPU); the optimizer step is the same either way")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--scheduler", choices=SCHEDULERS)
    p.add_argument("--warmup", type=float, help="a fraction of the steps (< 1) or a number of steps")
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--run-id", help=argparse.SUPPRESS)  # set by the UI's worker launcher
    p.add_argument("--store", help="run store folder (default: the app's runs folder)")
    p.add_argument("--no-store", action="store_true", help="do not register the run in the run store")
    return p


def _mapping(text: str) -> dict:
    from lora_app.data import DataError, parse_mapping

    try:
        return parse_mapping(text) or {}
    except DataError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_config(args: dict) -> TrainConfig:
    values = TrainConfig.from_file(args["config"]).to_dict() if "config" in args else {}
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in args.items() if k in names})
    return TrainConfig.from_dict(values)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        argv = argv[1:]
    args = vars(parser().parse_args(argv))
    try:
        config = build_config(args)
        config.validate()
    except TrainConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0 or args.get("no_store"):
        return _run(config, store=None, run_id=None)  # only the main process of a multi-GPU run keeps the books

    from lora_app.training.store import RunStore
    from lora_app.training.trainer import TrainingError, check_output
    from lora_app.training.worker import device_name

    store = RunStore(args.get("store"))
    run_id = args.get("run_id")
    if run_id is None:
        try:
            check_output(config)
        except TrainingError as err:
            print(err, file=sys.stderr)
            return 2
        existing = store.find_by_output(config.output) if config.resume else None
        if existing is not None:
            store.update(existing.id, config=config.to_dict())
            store.requeue(existing.id)
            run_id = existing.id
        else:
            run_id = store.create_run(config.to_dict(), output=config.output, device=device_name()).id
    return _run(config, store, run_id)


def _wait_for_turn(store, run_id: str) -> bool:
    """Block until this run holds the device; False when it was cancelled while queued."""
    told = False
    while not store.claim(run_id, os.getpid()):
        run = store.get(run_id)
        if run.status != "queued":
            return False
        if not told:
            print("queued: another training job is using the device; this one starts when it ends", flush=True)
            told = True
        time.sleep(1.0)
    return True


def _run(config: TrainConfig, store, run_id: str | None) -> int:
    from lora_app.training.trainer import Callbacks, train

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # SIGTERM = graceful cancel: checkpoint, then exit
    if store is not None and not _wait_for_turn(store, run_id):
        print("cancelled before it started", flush=True)
        return 0

    done = threading.Event()
    progress = {"step": None, "total": None}

    def beat():
        while not done.wait(HEARTBEAT_EVERY):
            if store.heartbeat(run_id, progress["step"], progress["total"]):
                stop.set()

    metrics_file = Path(config.output) / "metrics.jsonl"

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
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if k in ("loss", "eval_loss", "lr", "grad_norm",
                                                                          "tokens_per_second"))
        print(f"step {step}/{progress['total']} {shown}", flush=True)

    callbacks = Callbacks(on_start=on_start, on_log=on_log, should_stop=stop.is_set,
                          log=lambda text: print(text, flush=True))
    status, error, summary, code = "failed", None, None, 1
    try:
        outcome = train(config, callbacks)
        status, summary, code = outcome.status, outcome.summary, 0
        print(f"{status}: {json.dumps(summary, default=str)}", flush=True)
    except KeyboardInterrupt:
        error = "Interrupted."
    except Exception as err:
        error = _explain(err)
        print(error, file=sys.stderr, flush=True)
        if not _expected(err):
            traceback.print_exc()
    finally:
        done.set()
        if store is not None:
            if summary is not None:
                store.update(run_id, step=summary["steps"])
            store.finish(run_id, status, error=error, summary=summary)
    return code


def _expected(err: Exception) -> bool:
    """Errors whose message says it all (no traceback needed in the log)."""
    from lora_app.errors import user_errors

    return isinstance(err, user_errors())


def _explain(err: Exception) -> str:
    import torch

    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return OOM_ADVICE
    if _expected(err):
        return str(err)
    return f"Training failed: {type(err).__name__}: {err}"

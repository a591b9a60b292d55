"""`python -m lora_app train`: one training run, registered in the run store.

Settings come from the TrainConfig defaults, then ``--config`` (YAML/JSON, the same keys), then the
flags given on the command line; the flags are generated from TrainConfig's declarations. A run is
checked before it is registered (a mistake leaves nothing in the store), waits its turn for the
device (another job may be running), trains with a heartbeat, and leaves its status, metrics and
summary in the store. The studio's worker starts the same command with ``--run-id`` for a run it
registered. Exit codes: 0 done or cancelled, 1 failed, 2 bad settings.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path

from lora_app.data import parse_mapping
from lora_app.errors import DataError, UserError
from lora_app.training.config import GROUPS, TrainConfig, flag, value_type
from lora_app.training.preflight import quick_check
from lora_app.training.store import RunStore


def parser() -> argparse.ArgumentParser:
    """One option per TrainConfig field, grouped, each with its meaning and default."""
    p = argparse.ArgumentParser(prog="python -m lora_app train", description="Train a LoRA adapter.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML or JSON file with the same keys as these options (flags given here win)")
    p.add_argument("--store", help="run store folder (default: the app's runs folder)")
    p.add_argument("--no-store", action="store_true", help="do not register the run in the run store")
    p.add_argument("--json", action="store_true", help="end with the run's summary as JSON instead of in words")
    p.add_argument("--run-id", help=argparse.SUPPRESS)  # a run the studio registered; its settings are in the store
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in fields(TrainConfig):
        _add_option(groups[f.metadata["group"]], f)
    return p


def _add_option(group, f) -> None:
    kind, help_text = value_type(f), f.metadata["help"].replace("%", "%%")
    if kind is bool:
        if f.default:  # on by default: the flag turns it off
            group.add_argument(flag("no_" + f.name), dest=f.name, action="store_false", help=f"off: {help_text}")
        else:
            group.add_argument(flag(f.name), action="store_true", help=help_text)
        return
    if f.metadata["required"]:
        shown = "required"
    elif f.default is None:
        shown = f"default: unset = {f.metadata['unset']}"
    else:
        shown = f"default: {f.default}"
    convert, metavar = {dict: (_mapping, "FIELD=COLUMN,..."), list: (_lines, "FILE")}.get(kind, (kind, None))
    group.add_argument(flag(f.name), type=convert, choices=f.metadata["choices"], metavar=metavar,
                       help=f"{help_text} ({shown})")


def _mapping(text: str) -> dict:
    try:
        return parse_mapping(text) or {}
    except DataError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _lines(path: str) -> list[str]:
    """A list setting from a file: one item per non-blank line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise argparse.ArgumentTypeError(f"{path} holds no lines: write one item per line")
    return lines


def build_config(args: dict) -> TrainConfig:
    """Defaults, then ``--config``, then the flags given on the command line (``args`` holds only those)."""
    values = TrainConfig.from_file(args["config"]).to_dict() if "config" in args else {}
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in args.items() if k in names})
    return TrainConfig.resumed(values) if values.get("resume") else TrainConfig.from_dict(values)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        argv = argv[1:]
    args = vars(parser().parse_args(argv))
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one process keeps the books
    store = RunStore(args.get("store")) if main_process and not args.get("no_store") else None
    try:
        if "run_id" in args:  # started by the studio's worker, which checked the run before registering it
            config, run_id = TrainConfig.from_dict(store.get(args["run_id"]).config), args["run_id"]
        else:
            config, run_id = build_config(args), None
            quick_check(config)
        # torch, transformers and the model code load only now, so that a mistake found above is
        # answered in a fraction of a second
        from lora_app.training.run import start
        return start(config, store, run_id, as_json="json" in args, main_process=main_process)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

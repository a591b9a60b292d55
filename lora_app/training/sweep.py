"""`python -m lora_app sweep`: the same training run with a few settings varied, one run per combination.

``--grid rank=8,16 --grid alpha=16,32`` makes four runs (first axis slowest), each an ordinary run:
its own folder under ``--output`` named after its values (``rank8-alpha16``), registered in the run
store where the studio shows it, with its ``train.log``, metrics and summary. Every run is checked
before the first one trains, the torch-free checks first (as ``train`` does, so a mistake is
answered at once), then those that need the model's config and tokenizer: a mistake in the last
combination must not appear after the others have trained. The runs then train one after another,
and the sweep ends with a table comparing them. Ctrl-C stops the run in progress and starts no other.
Exit codes: 0 every run completed, 1 some did not, 2 bad settings (nothing trained), 130 interrupted.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
import signal
import sys
import threading
from dataclasses import fields, replace
from pathlib import Path
from typing import NoReturn

from lora_app.errors import SettingsError, TrainConfigError, UserError
from lora_app.training import cli
from lora_app.training.config import TrainConfig, label, optional, value_type
from lora_app.training.preflight import quick_check
from lora_app.training.store import RunStore

MAX_RUNS = 16  # a grid grows multiplicatively; beyond this it is more likely a slip than a plan

# settings every run of a sweep shares, and why
NOT_SWEPT = {"data": "every run of a sweep trains on the same data (--data)",
             "val_data": "every run of a sweep is validated on the same data (--val-data)",
             "output": "each run's folder is made under --output, named after its values",
             "resume": "a sweep starts new runs (continue one with `python -m lora_app train --output RUN --resume`)"}
SCALARS = (int, float, bool, str)  # a mapping or a list (data mapping, probe prompts) is given once, as a flag
BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
EXAMPLE = "rank=8,16"


def parse_grid(spec: str | list[str]) -> dict[str, list]:
    """The settings to vary and their values, from ``"rank=8,16; alpha=16,32"`` (axes separated by
    ``;`` or new lines) or ``["rank=8,16", "alpha=16,32"]`` (repeated ``--grid``). Values are
    separated by commas, or by ``|`` when a value holds commas (``targets=q_proj,v_proj|all-linear``);
    ``none`` unsets a setting that may be unset. Raises ``TrainConfigError`` keyed ``grid``."""
    items = [spec] if isinstance(spec, str) else list(spec)
    axes = [axis.strip() for item in items for axis in re.split(r"[;\n]", item) if axis.strip()]
    if not axes:
        _refuse(f"the grid is empty: give one or more settings with their values, e.g. --grid {EXAMPLE}")
    settings = {f.name: f for f in fields(TrainConfig)}
    grid = {}
    for axis in axes:
        name, equals, text = axis.partition("=")
        name = name.strip().lower().replace("-", "_")
        if not equals or not name:
            _refuse(f"{axis!r} is not setting=value,value (e.g. {EXAMPLE})")
        if name not in settings:
            _refuse(_unknown(name))
        if name in NOT_SWEPT or value_type(settings[name]) not in SCALARS:
            _refuse(f"{name} cannot be swept: {NOT_SWEPT.get(name, 'give it once, as a flag')}")
        if name in grid:
            _refuse(f"{name} is in the grid twice: give all its values at once ({name}=a,b)")
        texts = [t.strip() for t in text.split("|" if "|" in text else ",")]
        if not all(texts):
            _refuse(f"{name} has {'an empty value' if any(texts) else 'no values'} in {axis!r}: give one or more "
                    "values, separated by commas")
        values = [_value(settings[name], t) for t in texts]
        parts = [_part(name, v) for v in values]  # two runs cannot share a folder
        for i, part in enumerate(parts):
            if part in parts[:i]:
                _refuse(f"{name} gets the same value twice ({texts[parts.index(part)]!r} and {texts[i]!r})")
        grid[name] = values
    runs = math.prod(map(len, grid.values()))
    if runs > MAX_RUNS:
        sizes = " x ".join(f"{len(values)} {name}" for name, values in grid.items())
        _refuse(f"the grid makes {runs} runs ({sizes}); a sweep runs at most {MAX_RUNS}: give fewer values")
    return grid


def expand(base: TrainConfig, grid: dict[str, list]) -> list[tuple[str, TrainConfig]]:
    """One (label, settings) per combination, first axis slowest: ``base`` with the combination's
    values, its output ``base.output / label`` (unset when ``base.output`` is: the studio's worker
    sets it). A combination the settings checks refuse is named with its problems
    (``TrainConfigError`` keyed by label); the base's own problems are left to whoever checks it."""
    runs = []
    for values in itertools.product(*grid.values()):
        changes = dict(zip(grid, values))
        name = "-".join(_part(setting, value) for setting, value in changes.items())
        output = str(Path(base.output) / name) if base.output else None
        runs.append((name, replace(base, **changes, output=output)))
    own = base.problems()
    found = {}
    for name, config in runs:
        problems = [text for setting, text in config.problems().items() if own.get(setting) != text]
        if problems:
            found[name] = f"run {name}: " + "; ".join(problems)
    if found:
        raise TrainConfigError(found)
    return runs


# ---- the grid's words -----------------------------------------------------------------------------
def _refuse(problem: str) -> NoReturn:
    raise TrainConfigError({"grid": problem})


def _unknown(name: str) -> str:
    """An unknown setting, with the settings (or their names in words) it is closest to."""
    spellings = {}
    for f in fields(TrainConfig):
        spellings[f.name] = spellings[label(f).lower().replace(" ", "_")] = f.name
    close = dict.fromkeys(spellings[s] for s in difflib.get_close_matches(name, spellings, n=3))
    hint = f"did you mean {' or '.join(close)}?" if close else "`python -m lora_app train --help` lists the settings"
    return f"unknown setting {name!r} in the grid ({hint})"


def _value(f, text: str):
    """``text`` as a value of setting ``f``."""
    kind, choices = value_type(f), f.metadata["choices"]
    if text.lower() == "none" and optional(f):
        return None
    if choices is not None:
        if text not in choices:
            _refuse(f"{f.name} takes one of {', '.join(choices)}; got {text!r}")
        return text
    if kind is bool:
        if text.lower() not in BOOLEANS:
            _refuse(f"{f.name} takes true or false; got {text!r}")
        return BOOLEANS[text.lower()]
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        _refuse(f"{f.name} takes {'whole numbers' if kind is int else 'numbers'}; got {text!r}")


def _shown(value) -> str:
    """A value as the grid writes it (``16``, not ``16.0``)."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return repr(value).removesuffix(".0") if isinstance(value, float) else str(value)


def _changes(grid: dict[str, list], config: TrainConfig) -> str:
    """What a run's settings are along the grid's axes, as the grid is written (``rank=8 alpha=16``)."""
    return " ".join(f"{name}={_shown(getattr(config, name))}" for name in grid)


def _part(name: str, value) -> str:
    """A setting's value in a run's folder name: ``rank8``, ``lr0.0001``, ``no_double_quant``."""
    if isinstance(value, bool):
        text = name if value else "no_" + name
    else:
        text = name + _shown(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


# ---- the command ------------------------------------------------------------------------------------
def parser():
    """The train command's options (every setting) and the grid."""
    p = cli.parser()
    p.prog = "python -m lora_app sweep"
    p.description = ("Train one LoRA adapter per combination of the --grid values, the other settings as given. "
                     "--output is the folder that holds the runs, one subfolder per combination.")
    p.add_argument("--grid", action="append", required=True, metavar="SETTING=V1,V2,...",
                   help=f"a setting and the values to try (repeat for more settings, at most {MAX_RUNS} runs in "
                        "all), e.g. --grid rank=8,16 --grid lr=1e-4,2e-4; separate values with | when they hold "
                        "commas; none unsets a setting")
    return p


def _plan(args: dict) -> tuple[dict[str, list], list[tuple[str, TrainConfig]]]:
    """The grid and its runs, each checked as ``train`` checks a run before loading torch."""
    if args.get("resume"):
        raise TrainConfigError({"resume": NOT_SWEPT["resume"]})
    grid = parse_grid(args["grid"])
    runs = expand(cli.build_config(args), grid)
    check_all(runs, quick_check)
    return grid, runs


def check_all(runs: list[tuple[str, TrainConfig]], check) -> None:
    """``check`` every run; what they fail is raised at once, each run named, or said once, as
    ``train`` would, when every run fails alike (a mistake in the settings they share)."""
    errors = {}
    for name, config in runs:
        try:
            check(config)
        except UserError as err:
            errors[name] = err
    words = {name: "; ".join(err.problems.values()) if isinstance(err, SettingsError) else str(err)
             for name, err in errors.items()}
    if len(errors) == len(runs) and len(set(words.values())) == 1:
        raise next(iter(errors.values()))
    if errors:
        raise TrainConfigError({name: f"run {name}: {text}" for name, text in words.items()})


def _train_all(grid: dict[str, list], runs: list[tuple[str, TrainConfig]], store: RunStore | None, start) -> list[dict]:
    """Train the runs in turn with ``start`` (``training.run.start``); a run that fails does not stop
    the others, Ctrl-C does. Returns each run's row of the final table."""
    statuses, interrupted = {}, threading.Event()

    def on_interrupt(*_):
        interrupted.set()  # the run's own handler records it as interrupted and returns
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        for number, (name, config) in enumerate(runs, 1):
            print(f"\n[{number}/{len(runs)}] {name}: {_changes(grid, config)}", flush=True)
            statuses[name] = "interrupted"
            try:
                code = start(config, store, None, as_json=False, main_process=True)
            except UserError as err:  # found only now: the folder was taken since the checks, ...
                print(f"error: {err}", file=sys.stderr, flush=True)
                code = 2
            if interrupted.is_set():
                break
            statuses[name] = "failed" if code else _summary(config).get("status", "cancelled")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    return [_row(name, config, statuses.get(name, "not started")) for name, config in runs]


def _summary(config: TrainConfig) -> dict:
    try:
        return json.loads((Path(config.output) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _row(name: str, config: TrainConfig, status: str) -> dict:
    summary = _summary(config)
    return dict(run=name, output=config.output, status=status, final_loss=summary.get("final_loss"),
                eval_loss=summary.get("eval_loss"), tokens_per_second=summary.get("useful_tokens_per_second"))


def _table(rows: list[dict]) -> str:
    """The runs side by side: status, final and eval loss, tokens/s."""
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [("run", "status", "final loss", "eval loss", "tokens/s")]
    lines += [(r["run"], r["status"], number(r["final_loss"], ".4f"), number(r["eval_loss"], ".4f"),
               number(r["tokens_per_second"], ".0f")) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sweep":
        argv = argv[1:]
    args = vars(parser().parse_args(argv))
    try:
        grid, runs = _plan(args)
        print(f"sweep: {len(runs)} runs in {Path(runs[0][1].output).parent}", flush=True)
        for name, config in runs:
            print(f"  {name}: {_changes(grid, config)}")
        # torch, transformers and the model code load only now, as in `train`
        from lora_app.training.run import start
        from lora_app.training.trainer import preflight
        check_all(runs, preflight)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was trained", file=sys.stderr)
        return 130
    rows = _train_all(grid, runs, None if args.get("no_store") else RunStore(args.get("store")), start)
    print(json.dumps(rows) if "json" in args else "\n" + _table(rows), flush=True)
    if any(row["status"] == "interrupted" for row in rows):
        return 130
    return 0 if all(row["status"] == "completed" for row in rows) else 1

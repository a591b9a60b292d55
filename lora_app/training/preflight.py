"""The checks a run passes before anything heavy loads: its settings, where its model comes from, the
first rows of its data and its output folder.

Importable without torch or transformers, so the command line answers a mistake in a fraction of a
second; ``trainer.preflight`` adds the checks that need the model's config and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_app.data import load_split
from lora_app.errors import DataError, ModelLoadError, TrainConfigError, TrainingError
from lora_app.model_source import check_source, is_default
from lora_app.training.config import TrainConfig

# what a run folder holds before its training has produced anything (plan.json: the plan it was started with)
RUN_FILES = {"train.log", "config.json", "plan.json"}
DATA_SETTINGS = {"data", "val_data", "val_fraction", "data_format", "data_mapping", "template", "seq_len"}
DATA_CHECK_ROWS = 64  # enough to recognise the layout and the mapping, read in well under a second


def quick_problems(config: TrainConfig) -> dict[str, str]:
    """What is wrong with the settings, the model's name and the data's first rows, by setting."""
    problems = config.problems()
    if not is_default(config.model):
        try:
            check_source(config.model)
        except ModelLoadError as err:
            problems["model"] = str(err)
    if not problems.keys() & DATA_SETTINGS:
        c = config
        try:
            load_split(c.data, format=c.data_format, mapping=c.data_mapping, val_fraction=c.val_fraction,
                       val_data=c.val_data, seed=c.seed, limit=DATA_CHECK_ROWS)
        except DataError as err:
            problems["data"] = str(err)
    return problems


def quick_check(config: TrainConfig) -> Path:
    """``quick_problems`` raised as one ``TrainConfigError``, then the output folder; returns it."""
    problems = quick_problems(config)
    if problems:
        raise TrainConfigError(problems)
    return check_output(config)


def check_output(config: TrainConfig) -> Path:
    """An existing run folder is never overwritten: only --resume may continue in it."""
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise TrainingError(f"The output path {output} is a file; choose a folder.")
    existing = {p.name for p in output.iterdir()} - RUN_FILES if output.is_dir() else set()
    if config.resume:
        finished = finished_steps(output)
        if finished is not None and _same_length(config, output):
            raise TrainingError(f"The run in {output} already finished its {finished} steps, so there is nothing to "
                                "resume; its adapter stays as it is. To train it further, resume with a larger "
                                "--max-steps or --epochs.")
        if latest_checkpoint(output) is None:
            raise TrainingError(f"Nothing to resume in {output}: it holds no checkpoint.")
    elif existing:
        raise TrainingError(f"The output folder {output} already holds a run ({', '.join(sorted(existing)[:4])}); "
                            "choose a new folder, or pass --resume to continue it.")
    return output


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint (``checkpoints/checkpoint-<step>`` with its state)."""
    checkpoints = [p for p in Path(run_dir).glob("checkpoints/checkpoint-*") if (p / "state.json").exists()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[1]), default=None)


def finished_steps(output: Path) -> int | None:
    """The steps of the completed run in ``output``, or None when it has not completed."""
    try:
        summary = json.loads((output / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary.get("steps") if summary.get("status") == "completed" else None


def _same_length(config: TrainConfig, output: Path) -> bool:
    """Whether ``config`` asks for no more training than the run in ``output`` was configured for."""
    stored = TrainConfig.from_file(output / "config.json")
    return (config.max_steps, config.epochs) == (stored.max_steps, stored.epochs)

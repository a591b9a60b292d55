"""Everything a user can cause, as types. Imports nothing, so every layer can raise them.

``UserError`` is the base: its message is written for the person who caused it. The command line
prints it as ``error: <message>`` and exits 2 (``training/cli.py``, ``inference/cli.py``); the studio
shows it in the page (``ui/common.explain``). Anything else that escapes is a bug and is reported as one. Code that needs to tell
errors apart looks at their type and fields, never at their wording.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user asked for cannot be done; ``str(err)`` says what, and how to fix it."""


class SettingsError(UserError):
    """Invalid settings, every problem at once. ``problems``: setting name -> what is wrong with it."""

    heading = "Invalid settings"

    def __init__(self, problems: dict[str, str]):
        self.problems = dict(problems)
        super().__init__(f"{self.heading}:\n" + "\n".join(f"- {p}" for p in self.problems.values()))


class LoraConfigError(SettingsError):
    """An adapter's settings (``lora.LoraConfig``) are invalid."""

    heading = "Invalid LoRA settings"


class TrainConfigError(SettingsError):
    """A training run's settings (``training.TrainConfig``) are invalid."""

    heading = "Invalid training settings"


class DataError(UserError):
    """The dataset cannot be used (missing, unreadable, unknown layout, no usable rows, ...)."""


class ModelLoadError(UserError):
    """The base model cannot be loaded (not found, offline, not a causal LM, pickle weights, ...)."""


class TargetError(UserError):
    """The target modules match no layer of the model (the message lists those that can be adapted)."""


class AdapterLoadError(UserError):
    """An adapter folder cannot be used. ``kind``: "file" (missing, unsafe or corrupt files),
    "unsupported" (an adapter type we do not read), "base" (trained for another base model) or
    "name" (the model already has an adapter of that name)."""

    def __init__(self, message: str, kind: str = "file"):
        super().__init__(message)
        self.kind = kind


class InferenceError(UserError):
    """A generation, mode switch or export request the inference layer refuses."""


class AdapterNameTaken(InferenceError):
    """Another adapter is already loaded under ``name``."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


class TrainingError(UserError):
    """A run cannot start or go on (output folder taken, nothing to resume, diverged, ...)."""


class RunNotFound(UserError):
    """No run ``run_id`` in the store (it was deleted)."""

    def __init__(self, run_id: str):
        super().__init__("That run no longer exists: it was deleted. Pick another run.")
        self.run_id = run_id


class NoCheckpoint(UserError):
    """A run has no checkpoint adapter at ``step`` (``saved``: the steps it has, in words)."""

    def __init__(self, run_name: str, step: int, saved: str):
        super().__init__(f"Run {run_name} saved no checkpoint at step {step} (checkpoints: {saved}). Train with "
                         "'save every' set to keep the adapters of the steps you want to choose from.")
        self.run_name, self.step, self.saved = run_name, step, saved


class OutOfMemory(TrainingError):
    """A step did not fit in memory even with one example per micro-batch (``step``: 1-based)."""

    def __init__(self, step: int, detail: str):
        super().__init__(f"Out of memory at step {step} even with one example per micro-batch ({detail}). Use a "
                         "shorter sequence length, 4-bit quantization (--quantization 4bit), gradient checkpointing "
                         "(--gradient-checkpointing) or a lower rank; `python -m lora_app plan` shows what fits.")
        self.step, self.detail = step, detail


class NoSuchRun(UserError):
    """No run in the store at ``root`` has the id, the name or the folder ``key``."""

    def __init__(self, key: str, root):
        super().__init__(f"No run {key!r} in the run store {root}: give a run's id, its name or its folder "
                         "(the Runs tab lists them; --store picks another run store).")
        self.key, self.root = key, root

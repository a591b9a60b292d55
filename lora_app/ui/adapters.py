"""The adapters Chat, Compare and Runs offer, and the one inference engine they share.

A choice is ``run:<run id>`` (a finished run's adapter, loaded on first use) or ``name:<adapter>``
(an adapter uploaded into the engine). Resolving a choice loads it into the engine's RAM cache once;
after that, switching to it is a pointer change (see ``lora_app.inference``).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from lora_app.data import PromptFormat, SystemPrompt
from lora_app.errors import AdapterNameTaken, UserError
from lora_app.inference import InferenceEngine, Mode
from lora_app.training.store import FINISHED
from lora_app.ui.common import run_store

_engine = None
_engine_lock = threading.Lock()


def engine():
    """The process-wide inference engine (one base model in memory, shared by every browser session)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = InferenceEngine()
        return _engine


def gpu_busy() -> bool:
    """True while a training job runs on a GPU: chat then runs on the CPU so it never competes with it."""
    return any(r.status == "running" and r.device.startswith("cuda") for r in run_store().list())


def base_for(model: str | None, quantization: str | None = None, for_export: bool = False):
    """The loaded base model for chat/compare, or ``for_export`` the one to merge into and export
    from (loaded on first use, then reused; on a GPU they are one)."""
    return engine().base((model or "default").strip(), quantization, gpu_busy=gpu_busy(), for_export=for_export)


def same_model(a: str | None, b: str | None) -> bool:
    def norm(m):
        m = (m or "default").strip()
        path = Path(m).expanduser()
        return str(path.resolve()) if m != "default" and path.exists() else m

    return norm(a) == norm(b)


def adapter_choices(model: str | None) -> list[tuple[str, str]]:
    """(label, value) for every adapter usable on ``model``: finished runs first, then uploads."""
    choices = []
    for run in run_store().list():
        # a cancelled run has an adapter once one of its checkpoints is promoted
        if run.status in FINISHED and same_model(run.config.get("model"), model) and run.adapter_path.is_dir():
            promoted = "" if run.promoted_step is None else f" (step {run.promoted_step})"
            choices.append((run.name + promoted, f"run:{run.id}"))
    run_folders = {str(r.adapter_path.resolve()) for r in run_store().list()}
    for base in engine().bases():
        if same_model(base.key.model, model):
            for info in base.adapters():
                choice = (f"{info.name} (uploaded)", f"name:{info.name}")
                if str(Path(info.folder).resolve()) not in run_folders and choice not in choices:
                    choices.append(choice)
    return choices


def adapter_name(run) -> str:
    """The engine name for a run's adapter: the run's name, made acceptable (no dots), and the step of
    a promoted checkpoint (the engine then loads that adapter, not the one it holds for the run)."""
    name = re.sub(r"[^A-Za-z0-9_\-]+", "_", run.name).strip("_") or "adapter"
    return name if run.promoted_step is None else f"{name}-step{run.promoted_step}"


def resolve(base, choice: str) -> str:
    """The engine's adapter name for a choice, loading a run's adapter the first time."""
    kind, _, value = (choice or "").partition(":")
    if kind == "name":  # an upload: loaded onto the chat's base, and onto this one on first use
        folder = adapter_folder(choice)
        return value if folder is None else base.load_adapter(folder, name=value)
    if kind != "run":
        raise UserError(f"Unknown adapter {choice!r}.")
    run = run_store().get(value)
    if not run.adapter_path.is_dir():
        raise UserError(f"Run {run.name} has no final adapter (it is {run.status}).")
    try:
        return base.load_adapter(run.adapter_path, name=adapter_name(run))
    except AdapterNameTaken:  # another run of the same name: tell them apart by the run id
        return base.load_adapter(run.adapter_path, name=f"{adapter_name(run)}-{run.id[-6:]}")


def adapter_folder(choice: str) -> Path | None:
    """The folder of a chosen adapter (None when it is gone)."""
    kind, _, value = (choice or "").partition(":")
    if kind == "run":
        return run_store().get(value).adapter_path
    for base in engine().bases():
        for info in base.adapters():
            if info.name == value:
                return Path(info.folder)
    return None


def trained_system(choices: list[str] | None) -> tuple[SystemPrompt, str]:
    """The system prompt the first chosen adapter was trained with, and a line saying so (the page
    fills the chat's system prompt with it: chat then sees what training saw)."""
    for choice in choices or []:
        folder = adapter_folder(choice)
        found = PromptFormat.load(folder) if folder is not None else None
        if found is not None:
            system = found.system
            if system.text is not None:
                said = f"the system prompt it was trained with: “{system.text}”"
            elif system.use_default:
                said = "no system prompt of its own (the template's default, as in training)"
            else:
                said = "no system prompt, and not the template's default (as in training)"
            return system, f"System prompt set to {said}; change it below."
    return SystemPrompt(), ""


def parse_weights(text: str | None, count: int) -> list[float]:
    """Mixing weights from "0.7, 0.3"; empty means 1 for each adapter (the LoRA core's plain sum)."""
    text = (text or "").strip()
    if not text:
        return [1.0] * count
    try:
        weights = [float(w) for w in re.split(r"[,\s;]+", text) if w]
    except ValueError:
        raise UserError(f"Cannot read the mixing weights {text!r}: write numbers such as 0.7, 0.3.") from None
    if len(weights) != count:
        raise UserError(f"{len(weights)} weights for {count} adapters: give one weight per chosen adapter.")
    return weights


MODE_LABELS = [("Base model", "base"), ("One adapter", "adapter"), ("Weighted mix", "mix"), ("Merged", "merged")]


def mode_for(base, kind: str, choices: list[str] | None, weights_text: str | None = None):
    """The engine ``Mode`` for the chat's mode selector."""
    choices = list(choices or [])
    if kind == "base":
        return Mode.base()
    if not choices:
        raise UserError("Choose an adapter first (finish a training run, or upload one in Runs & adapters).")
    if kind == "adapter":
        if len(choices) > 1:
            raise UserError("'One adapter' uses a single adapter: keep one selected, or pick 'Weighted mix'.")
        return Mode.adapter(resolve(base, choices[0]))
    names = [resolve(base, c) for c in choices]
    weights = dict(zip(names, parse_weights(weights_text, len(names))))
    if kind == "mix":
        return Mode.mix(weights)
    if kind == "merged":
        return Mode.merged_of(weights)
    raise UserError(f"Unknown mode {kind!r}.")

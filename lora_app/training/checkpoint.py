"""Checkpoints that resume exactly, written as safetensors + JSON only (nothing is ever unpickled).

    checkpoint-<step>/adapter/            the adapter, in the standard layout
    checkpoint-<step>/optimizer.safetensors   every optimizer state tensor, keyed "<param index>.<name>"
    checkpoint-<step>/rng.safetensors     torch (and CUDA) generator states
    checkpoint-<step>/state.json          step, data position, optimizer/scheduler scalars, python RNG
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_app.data import PromptFormat
from lora_app.lora import save_adapter
from lora_app.paths import atomic_folder


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, model, adapter_name: str, optimizer, scheduler, trainer_state: dict,
                    prompt_format: PromptFormat | None = None) -> Path:
    """Write everything needed to resume at ``trainer_state["step"]``, atomically. With the run's
    ``prompt_format``, the checkpoint's adapter chats as the final one would (it may be promoted)."""
    tensors, optimizer_meta = _split_optimizer_state(optimizer.state_dict())
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    state = {**trainer_state, "optimizer": optimizer_meta, "scheduler": scheduler.state_dict(),
             "python_rng": random.getstate()}

    def write(tmp: Path):
        save_adapter(model, adapter_name, tmp / "adapter")
        if prompt_format is not None:
            prompt_format.save(tmp / "adapter")
        save_file(tensors, tmp / "optimizer.safetensors")
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, default=_jsonable))

    return atomic_folder(folder, write)


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def load_checkpoint(folder: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG from ``folder``; returns the trainer state.
    (The adapter itself is loaded by the caller, before the optimizer is built.)"""
    state = json.loads((folder / "state.json").read_text())
    optimizer.load_state_dict(_join_optimizer_state(load_file(folder / "optimizer.safetensors"), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state

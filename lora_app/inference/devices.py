"""Which device serves a generation, and what to do while training holds the GPU.

Training runs in its own worker process and may fill the GPU. Chat must keep working meanwhile, so
the caller (the UI knows from the run store whether a job is running on the GPU) passes
``gpu_busy=True`` and gets the CPU, with a note to show the user: a small model answers on CPU in
seconds, and nothing competes with the training job for GPU memory. Without a GPU everything is CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_app.errors import InferenceError
from lora_app.models import default_device

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cpu" or "cuda:N" (a bare "cuda" when the user asked for it)
    note: str = ""  # shown to the user when the choice is not the obvious one


def choose_device(requested: str | None = "auto", *, gpu_busy: bool = False) -> DeviceChoice:
    """``auto``/None: the GPU if there is one and no training job holds it, else the CPU;
    ``cpu``; ``cuda``/``cuda:N``: that GPU (an error if there is none)."""
    requested = (requested or "auto").strip().lower()
    has_cuda = torch.cuda.is_available()
    if requested == "auto":
        if has_cuda and gpu_busy:
            return DeviceChoice("cpu", "A training job is using the GPU, so this chat runs on the CPU "
                                       "(slower, but it does not disturb training).")
        return DeviceChoice(default_device())
    if requested == "cpu":
        return DeviceChoice("cpu")
    if requested.startswith("cuda"):
        if not has_cuda:
            raise InferenceError("no CUDA GPU is available here; choose the CPU (device 'cpu' or 'auto').")
        note = "A training job is also using this GPU; generation may be slow or run out of memory." if gpu_busy else ""
        return DeviceChoice(requested, note)
    raise InferenceError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N).")

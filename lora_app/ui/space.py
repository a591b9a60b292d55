"""Running as a Hugging Face Space (or anywhere): where files go, and what hardware there is.

A Space's disk is wiped on every restart except ``/data`` (its persistent storage, when bought), so
when ``/data`` is writable the app keeps its home there: runs, datasets and the converted default
model survive restarts. ``LORA_APP_HOME`` / ``LORA_APP_RUNS`` set by the user always win.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PERSISTENT = Path("/data")


def configure_storage(persistent: Path = PERSISTENT) -> str | None:
    """Point ``LORA_APP_HOME`` at ``/data/lora_app`` when ``/data`` exists and is writable and the
    user chose nothing; returns the folder chosen, or None when nothing changed."""
    if os.environ.get("LORA_APP_HOME") or os.environ.get("LORA_APP_RUNS"):
        return None
    if persistent.is_dir() and os.access(persistent, os.W_OK):
        home = persistent / "lora_app"
        os.environ["LORA_APP_HOME"] = str(home)
        return str(home)
    return None


def device_summary() -> str:
    """One line for the header: the GPU (name, memory) or the CPU (cores)."""
    if torch.cuda.is_available():
        names = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            names.append(f"{props.name} ({props.total_memory / 2**30:.0f} GiB)")
        return "GPU: " + ", ".join(names)
    return f"CPU only, {os.cpu_count()} cores (small models such as the default)"

"""Where the app keeps its files: ``LORA_APP_HOME`` (default ``~/.cache/lora_app``)."""

import json
import os
from pathlib import Path


def app_home() -> Path:
    """The root folder for caches and runs; created on first use."""
    home = Path(os.environ.get("LORA_APP_HOME") or Path.home() / ".cache" / "lora_app")
    home.mkdir(parents=True, exist_ok=True)
    return home


def offline() -> bool:
    """Whether the Hugging Face Hub is off limits (``HF_HUB_OFFLINE`` set to 1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def write_json(path: str | os.PathLike, values: dict) -> None:
    """Write ``values`` as JSON atomically: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=2, default=str))
    os.replace(tmp, path)

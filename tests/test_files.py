"""Files the app writes for the user: readable by others as the umask allows (tempfile and safetensors
would make them private), and adapters that name the base model they were trained on as peft, vLLM
and TGI can find it."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from conftest import save_tiny, tiny_model, tiny_tokenizer
from lora_app.inference.export import zip_adapter
from lora_app.lora import LoraConfig, add_adapter, export_merged, load_adapter, save_adapter
from lora_app.lora.io import CONFIG_NAME
from lora_app.model_source import DEFAULT_MODEL, base_model_id
from lora_app.models import load_model
from lora_app.paths import atomic_file, atomic_folder, write_json


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(root):
    """{relative path: permission bits} of ``root`` and everything under it."""
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(e.relative_to(root.parent)): stat.S_IMODE(e.stat().st_mode) for e in entries}


def assert_umask_modes(root, umask):
    expected = {name: (0o777 if (root.parent / name).is_dir() else 0o666) & ~umask for name in modes(root)}
    assert modes(root) == expected


def test_atomic_writers_follow_the_umask(tmp_path, umask):
    write_json(tmp_path / "summary.json", {"a": 1})
    atomic_file(tmp_path / "out" / "notes.txt", lambda tmp: tmp.write_text("hi"))

    def write(tmp):
        save_file({"w": torch.zeros(2)}, tmp / "w.safetensors")  # safetensors itself writes 0600
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.json").write_text("{}")

    atomic_folder(tmp_path / "folder", write)
    atomic_folder(tmp_path / "folder", write)  # replacing an existing folder
    for name in ("summary.json", "out/notes.txt", "folder"):
        assert_umask_modes(tmp_path / name, umask)
    if umask == 0o022:
        assert modes(tmp_path / "folder")["folder/w.safetensors"] == 0o644
        assert modes(tmp_path / "folder")["folder"] == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out", "summary.json"]  # no temporaries left


def test_adapters_merged_models_and_zips_follow_the_umask(tmp_path, umask):
    model = tiny_model("llama")
    add_adapter(model, LoraConfig(rank=2, targets=["q_proj"]))
    save_adapter(model, "default", tmp_path / "adapter")
    export_merged(model, tmp_path / "merged", tiny_tokenizer())
    zip_adapter(tmp_path / "adapter", tmp_path / "adapter.zip")
    for name in ("adapter", "merged", "adapter.zip"):
        assert_umask_modes(tmp_path / name, umask)


def test_the_default_model_is_recorded_by_its_hub_id(tmp_path, monkeypatch):
    assert base_model_id(DEFAULT_MODEL) == base_model_id(None) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert base_model_id("mine") == str(tmp_path.resolve() / "mine")


def test_an_adapter_names_the_absolute_folder_of_its_base(tmp_path, monkeypatch):
    save_tiny("llama", tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    model, _ = load_model("tiny", device="cpu")
    add_adapter(model, LoraConfig(rank=2, targets=["q_proj"], base_model_name_or_path="tiny"))
    save_adapter(model, "default", tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "tiny").resolve())


def test_adapters_that_name_the_default_the_old_way_still_load(tmp_path):
    model = tiny_model("llama")
    add_adapter(model, LoraConfig(rank=2, targets=["q_proj"], base_model_name_or_path=DEFAULT_MODEL))
    save_adapter(model, "default", tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["base_model_name_or_path"] == DEFAULT_MODEL
    config = load_adapter(tiny_model("llama"), tmp_path / "adapter")
    assert config.base_model_name_or_path == DEFAULT_MODEL

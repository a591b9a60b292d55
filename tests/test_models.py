"""Model loading: the embedded default (converted once), local folders, quantization, clear errors."""

import json
import threading

import pytest
import torch

from conftest import save_tiny
from lora_app.models import ModelLoadError, default_model_path, load_config, load_model, meta_model


def test_default_model_is_converted_once_and_answers(app_home):
    model, tokenizer = load_model("default", device="cpu")
    folder = default_model_path()
    assert folder.is_relative_to(app_home) and (folder / "model.safetensors").exists()
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    mtime = (folder / "model.safetensors").stat().st_mtime
    load_model("default", device="cpu")  # second load reads the cache, converts nothing
    assert (folder / "model.safetensors").stat().st_mtime == mtime


def test_local_folder_and_4bit(tmp_path):
    folder = save_tiny("qwen2", tmp_path / "qwen")
    model, tokenizer = load_model(folder, device="cpu")
    assert model.dtype == torch.float32 and tokenizer.pad_token
    q4, _ = load_model(folder, "4bit", device="cpu")
    assert type(q4.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_builds_in_two_threads_keep_their_dtypes(tmp_path):
    """transformers builds under torch's process-wide default dtype: the UI sizing a model on the meta
    device while chat loads a bf16 one used to leave layers of the chat model in fp32 (a dtype error
    on the next message) and the default stuck at bf16."""
    folder = save_tiny("llama", tmp_path / "llama")
    config, done = load_config(folder), threading.Event()

    def size_models():
        while not done.is_set():
            meta_model(config)

    sizer = threading.Thread(target=size_models)
    sizer.start()
    try:
        dtypes = [{p.dtype for p in load_model(folder, dtype=torch.bfloat16, device="cpu")[0].parameters()}
                  for _ in range(8)]
    finally:
        done.set()
        sizer.join()
    assert dtypes == [{torch.bfloat16}] * 8
    assert torch.get_default_dtype() == torch.float32


def test_offline_hub_id_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="offline"):
        load_model("someone/a-model-that-is-not-cached", device="cpu")


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(tmp_path / "vit", device="cpu")


def test_folder_without_weights_or_with_pickles_only(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")
    folder = save_tiny("llama", tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(folder)
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(folder)
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(folder / "config.json")


def test_unknown_quantization(tmp_path):
    with pytest.raises(ModelLoadError, match="quantization must be one of"):
        load_model(save_tiny("llama", tmp_path / "m"), "3bit")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"

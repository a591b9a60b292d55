"""Adapters over real bitsandbytes 4-bit (NF4) and 8-bit bases, on CPU."""

import pytest
import torch

from conftest import TINY, adapter_grads, adapter_grads_plain_and_fused, save_tiny, tiny_model
from lora_app.lora import (LoraConfig, adapter_modules, add_adapter, export_merged, group_shared_inputs, load_adapter,
                           lora_layers, merge_adapters, save_adapter)
from lora_app.lora.quant import dequantize_4bit
from lora_app.models import load_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.parametrize("variant", ["lora", "dora", "vera"])
def test_forward_and_backward_on_a_quantized_base(tiny_folder, quantization, variant, input_ids):
    model, _ = load_model(tiny_folder, quantization, device="cpu")
    add_adapter(model, LoraConfig(rank=4, variant=variant))
    kinds = {type(layer.base_layer).__name__ for layer in lora_layers(model).values()}
    assert kinds == {"Linear4bit" if quantization == "4bit" else "Linear8bitLt"}
    with torch.no_grad():  # non-zero B so every adapter parameter gets a gradient
        for adapter in adapter_modules(model, "default").values():
            for name, p in adapter.named_parameters():
                if "lora_B" in name or "lambda_b" in name:
                    p.normal_(0, 0.1)
    model.train()
    loss = model(input_ids, labels=input_ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_a_quantized_bases_mlps_are_fused_too(tiny_folder, quantization, input_ids):
    """fuse() checks a module against its fused forward on an input in the hidden states' dtype, not
    in the first parameter's: a 4- or 8-bit projection stores its weight as integers, and checked in
    those every quantized MLP kept transformers' forward (and its extra intermediate-size tensor).
    A 4-bit projection becomes one node too (its scales dequantized once), with the same gradients."""
    def build():
        return load_model(tiny_folder, quantization, device="cpu")[0]

    plain, fused, swapped = adapter_grads_plain_and_fused(build, input_ids)
    layers = TINY["num_hidden_layers"]
    assert swapped == {"rms_norm": 2 * layers + 1, "gated_mlp": layers,
                       "linear_4bit": 7 * layers if quantization == "4bit" else 0}
    assert plain.keys() == fused.keys() and any("down_proj" in name for name in fused)
    for name in plain:
        assert torch.allclose(plain[name], fused[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_grouped_quantized_siblings_train_as_before(tiny_folder, quantization, input_ids):
    """Grouped, a 4-bit base's q, k and v (and gate, up) are dequantized as one: their packed weights and
    scales moved side by side, each layer's own a view of them with the same values. An 8-bit base
    keeps each layer's product. Either way every adapter gradient is the ungrouped one (dropout off); on
    a CPU the weights stay where they are unless moved (see lora.group.shared_base)."""
    def grads(grouped: bool):
        model = load_model(tiny_folder, quantization, device="cpu")[0]
        return adapter_grads(model, input_ids, fused=True, grouped=grouped, dropout=0.0)[0]

    alone = grads(False)
    for move in (None, True):
        grouped = grads(move)
        assert alone.keys() == grouped.keys()
        for name in alone:
            assert torch.allclose(alone[name], grouped[name], rtol=1e-4, atol=1e-6), name
    if quantization == "8bit":
        return
    model, _ = load_model(tiny_folder, "4bit", device="cpu")
    add_adapter(model, LoraConfig(rank=4))
    layers = lora_layers(model)
    before = {path: dequantize_4bit(layer.base_layer, torch.float32) for path, layer in layers.items()}
    group_shared_inputs(model, move=True)  # as on a GPU
    for path, layer in layers.items():
        assert torch.equal(dequantize_4bit(layer.base_layer, torch.float32), before[path]), path
    attention = model.model.layers[0].self_attn
    storages = {getattr(attention, name).base_layer.weight.data.untyped_storage().data_ptr()
                for name in ("q_proj", "k_proj", "v_proj")}
    assert len(storages) == 1
    assert torch.equal(attention.q_proj.group.base(torch.eye(TINY["hidden_size"])).T,
                       torch.cat([before[f"model.layers.0.self_attn.{name}"] for name in ("q_proj", "k_proj", "v_proj")]))


def test_in_place_merge_is_refused_but_export_dequantizes(tiny_folder, input_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(tiny_folder, "4bit", device="cpu")
    add_adapter(model, LoraConfig(rank=4))
    with torch.no_grad():
        for adapter in adapter_modules(model, "default").values():
            adapter.lora_B.weight.normal_(0, 0.1)
    model.eval()
    weights_before = [dequantize_4bit(layer.base_layer, torch.float32) for layer in lora_layers(model).values()]
    with pytest.raises(ValueError, match="cannot merge into a Linear4bit"):
        merge_adapters(model)
    assert all(layer.merged is None for layer in lora_layers(model).values())
    with torch.no_grad():
        expected = model(input_ids).logits
    export_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    with torch.no_grad():
        got = plain(input_ids).logits
    # The exported weights are the exact dequantized base plus the adapter; only the matmul order differs.
    # On a CPU with AVX512-BF16 this holds only because load_model keeps bitsandbytes from repacking the
    # weight at the first forward in eval mode (it read 0.71 against logits of at most 0.55 before).
    assert (got - expected).abs().max() < 1e-3
    assert all(dequantize_4bit(layer.base_layer, torch.float32).equal(weight) for layer, weight in
               zip(lora_layers(model).values(), weights_before))


def test_adapter_trained_on_4bit_loads_on_full_precision(tiny_folder, input_ids, tmp_path):
    model, _ = load_model(tiny_folder, "4bit", device="cpu")
    add_adapter(model, LoraConfig(rank=4))
    save_adapter(model, "default", tmp_path / "a")
    full = tiny_model("llama")
    load_adapter(full, tmp_path / "a")
    assert lora_layers(full)

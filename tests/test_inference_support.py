"""Shared pieces of the inference tests (no tests here): tiny model folders and saved adapters.

Adapters are made the way a user gets them — ``add_adapter`` on the base, then ``save_adapter`` — with
lora_B randomized (it starts at zero, which would make every adapter a no-op and hide mistakes).
"""

from pathlib import Path

import pytest
import torch

from conftest import save_tiny, tiny_tokenizer
from lora_app.inference import GenerationSettings, InferenceEngine
from lora_app.lora import LoraConfig, adapter_modules, add_adapter, save_adapter

GREEDY = GenerationSettings(max_new_tokens=10, temperature=0.0, seed=0)


def make_adapter(model, folder: Path, seed: int, rank: int = 4, variant: str = "lora", scale: float = 0.5,
                 targets="all-linear", dropout: float = 0.0) -> Path:
    """Add an adapter to ``model``, give lora_B random values, save it."""
    name = f"tmp{seed}"
    add_adapter(model, LoraConfig(rank=rank, alpha=2 * rank, targets=targets, variant=variant, dropout=dropout), name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in adapter_modules(model, name).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * scale)
    save_adapter(model, name, folder)
    return folder


def wide_llama_folder(folder: Path) -> Path:
    """A llama with other layer sizes than ``tiny_model("llama")``: "another base model"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """{"base": tiny llama folder, "a"/"b"/"c": its adapters (in runs/run-X/adapter), "dora": a DoRA
    one trained with dropout, "gpt2": an adapter for a gpt2 base, "wide_base"/"wide": a wider llama and an adapter for it}."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("inference_assets")
    base = save_tiny("llama", root / "tiny-llama")
    found = {"base": base}
    for seed, key in enumerate(("a", "b", "c"), start=1):
        model = AutoModelForCausalLM.from_pretrained(base)
        found[key] = make_adapter(model, root / "runs" / f"run-{key}" / "adapter", seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    found["dora"] = make_adapter(model, root / "dora", 7, variant="dora", dropout=0.3)
    gpt2 = save_tiny("gpt2", root / "tiny-gpt2")
    gpt2_model = AutoModelForCausalLM.from_pretrained(gpt2)
    found["gpt2"] = make_adapter(gpt2_model, root / "gpt2-adapter", 8, targets=None)
    wide = found["wide_base"] = wide_llama_folder(root / "wide-llama")
    found["wide"] = make_adapter(AutoModelForCausalLM.from_pretrained(wide), root / "wide-adapter", 9)
    return found


@pytest.fixture
def engine(tmp_path):
    return InferenceEngine(device="cpu", dtype=torch.float32, work_dir=tmp_path / "work")  # exact comparisons


@pytest.fixture
def base(engine, assets):
    return engine.base(assets["base"])

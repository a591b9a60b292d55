"""peft as a reference oracle (test-only): adapters we save load in peft with the same logits, and
adapters peft saves load here. peft is never imported by lora_app."""

import pytest
import torch

from conftest import save_tiny, tiny_model
from lora_app.lora import LoraConfig, add_adapter, adapter_modules, load_adapter, save_adapter
from lora_app.models import load_model

peft = pytest.importorskip("peft")

VARIANTS_PEFT_KNOWS = {
    "lora": lambda targets: peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
    "rslora": lambda targets: peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True),
    "dora": lambda targets: peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True),
    "vera": lambda targets: peft.VeraConfig(r=4, target_modules=targets, save_projection=True),
}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def randomize(named_params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in named_params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("variant", list(VARIANTS_PEFT_KNOWS))
def test_ours_load_in_peft_with_the_same_logits(model_kind, variant, input_ids, tmp_path):
    model = tiny_model(model_kind)
    # VeRA needs one shape for every layer in peft 0.21 unless projections are large enough; all-linear
    # mixes shapes, which is exactly what the shared-projection slicing must get right.
    add_adapter(model, LoraConfig(rank=4, alpha=8, variant=variant, targets="all-linear"))
    randomize([(n, p) for a in adapter_modules(model, "default").values() for n, p in a.named_parameters()], 0)
    ours = logits(model, input_ids)
    save_adapter(model, "default", tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_model(model_kind), tmp_path / "ours").eval()
    assert (logits(theirs, input_ids) - ours).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS_PEFT_KNOWS))
def test_peft_adapters_load_here_with_the_same_logits(model_kind, variant, input_ids, tmp_path):
    targets = {"gpt2": ["c_attn", "c_proj", "c_fc"]}.get(model_kind, ["q_proj", "v_proj", "down_proj"])
    theirs = peft.get_peft_model(tiny_model(model_kind), VARIANTS_PEFT_KNOWS[variant](targets))
    randomize([(n, p) for n, p in theirs.named_parameters() if p.requires_grad], 1)
    theirs.eval()
    expected = logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path / "theirs")
    model = tiny_model(model_kind)
    config = load_adapter(model, tmp_path / "theirs")
    assert config.variant == variant
    assert (logits(model, input_ids) - expected).abs().max() <= 1e-4


def test_peft_rank_pattern_loads_with_per_layer_scaling(input_ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    theirs = peft.get_peft_model(tiny_model("llama"), config)
    randomize([(n, p) for n, p in theirs.named_parameters() if p.requires_grad], 2)
    theirs.eval()
    expected = logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path / "theirs")
    model = tiny_model("llama")
    load_adapter(model, tmp_path / "theirs")
    assert (logits(model, input_ids) - expected).abs().max() <= 1e-4
    save_adapter(model, "default", tmp_path / "again")  # and it round-trips back into peft
    back = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "again").eval()
    assert (logits(back, input_ids) - expected).abs().max() <= 1e-4


def test_peft_finds_the_base_of_our_adapter_by_itself(input_ids, tmp_path, monkeypatch):
    """AutoPeftModelForCausalLM loads the base the adapter names: a local folder, given relative to the
    folder the app ran in, is recorded as an absolute path."""
    save_tiny("llama", tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    model, _ = load_model("tiny", device="cpu")
    add_adapter(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    randomize([(n, p) for a in adapter_modules(model, "default").values() for n, p in a.named_parameters()], 3)
    ours = logits(model.eval(), input_ids)
    save_adapter(model, "default", tmp_path / "adapter")
    monkeypatch.chdir(tmp_path / "adapter")  # somewhere else: only an absolute path still leads to the base
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert (logits(theirs, input_ids) - ours).abs().max() <= 1e-4

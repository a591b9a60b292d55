"""GGUF export: the merged model round-trips through transformers' GGUF reader with the same greedy
tokens; the exported chat template and Ollama Modelfile render prompts as training did."""

import shutil
from collections import namedtuple

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import save_tiny
from lora_app.data import PromptFormat, SystemPrompt
from lora_app.errors import InferenceError
from lora_app.inference.gguf_export import export_gguf, write_gguf
from lora_app.inference.ollama import modelfile_for
from lora_app.inference.template_check import FALLBACK_CONVERSATIONS, check
from lora_app.lora import LoraConfig, add_adapter
from lora_app.models import load_model

PROMPTS = ["Who are you?", "What is the capital of France?", "Write a haiku about rain.", "Name three colors.",
           "How do I boil an egg?", "Translate 'hello' to French.", "What is 12 times 12?", "Tell me a joke."]


@pytest.fixture(scope="module")
def adapted():
    """The default model with an adapter that really changes its answers."""
    model, tokenizer = load_model("default")
    add_adapter(model, LoraConfig(rank=4, alpha=8, targets="all-linear"), "mine")
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    return model.eval(), tokenizer


def greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def round_trip(model, tokenizer, folder, gguf_type):
    """Greedy tokens of the model read back from its GGUF, per prompt (and its tokenizer's check)."""
    path = write_gguf(model, tokenizer, folder / f"m-{gguf_type}.gguf", gguf_type=gguf_type)
    back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32).eval()
    back_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    assert all(back_tokenizer(p)["input_ids"] == tokenizer(p)["input_ids"] for p in PROMPTS)
    assert not list(folder.glob(".*tmp*"))  # nothing half-written left behind
    return {prompt: greedy(back, tokenizer, prompt) for prompt in PROMPTS}


def test_the_merged_f16_gguf_gives_the_same_greedy_tokens(adapted, tmp_path):
    model, tokenizer = adapted
    assert round_trip(model, tokenizer, tmp_path, "f16") == {p: greedy(model, tokenizer, p) for p in PROMPTS}


def test_the_merged_q8_0_gguf_stays_close(adapted, tmp_path):
    """q8_0 rounds every weight (and this adapter is random, so many next tokens are near ties):
    measured 5 of 8 answers identical, 95 of 120 tokens before the first difference."""
    model, tokenizer = adapted
    back = round_trip(model, tokenizer, tmp_path, "q8_0")
    want = {p: greedy(model, tokenizer, p) for p in PROMPTS}
    agreeing = sum(next((i for i, (a, b) in enumerate(zip(want[p], back[p])) if a != b), len(want[p]))
                   for p in PROMPTS)
    assert sum(back[p] == want[p] for p in PROMPTS) >= 4 and agreeing >= 0.6 * sum(map(len, want.values()))


def test_exports_render_prompts_as_training_did(adapted, tmp_path):
    model, tokenizer = adapted
    for system in (SystemPrompt(), SystemPrompt(use_default=False), SystemPrompt("You are Quillon.")):
        trained = PromptFormat("tokenizer", tokenizer.chat_template, system)
        done = export_gguf(model, tokenizer, tmp_path / "m.gguf", trained, gguf_type="q8_0", overwrite=True)
        assert [c.target for c in done.checks] == ["GGUF chat template", "Ollama Modelfile"]
        assert done.identical, [c.line() for c in done.checks]
        assert "ollama create" in done.ollama_command("quillon")
    modelfile = (tmp_path / "m.Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf") and 'SYSTEM """You are Quillon."""' in modelfile
    # the export users would get without the check: the tokenizer's plain template, its default system prompt
    trained = PromptFormat("tokenizer", tokenizer.chat_template, SystemPrompt(use_default=False))
    plain = check("plain", lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                  trained, tokenizer, FALLBACK_CONVERSATIONS)
    assert not plain.identical and "conversation 1, token 3" in plain.line() and "helpful AI assistant" in plain.line()


def test_a_template_ollama_cannot_take_gets_no_modelfile(adapted):
    from lora_app.data.templates import NAMED_TEMPLATES

    _, tokenizer = adapted
    modelfile, why = modelfile_for(PromptFormat("alpaca", NAMED_TEMPLATES["alpaca"], SystemPrompt()), tokenizer)
    assert modelfile is None and "ChatML" in why


def test_refused_clearly_before_writing(adapted, tmp_path, monkeypatch):
    model, tokenizer = adapted
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**40, 2**40, 10 * 2**20))
    with pytest.raises(InferenceError, match="GiB free"):
        write_gguf(model, tokenizer, tmp_path / "full.gguf")
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    gpt2 = AutoModelForCausalLM.from_pretrained(save_tiny("gpt2", tmp_path / "gpt2"))
    with pytest.raises(InferenceError, match="not gpt2"):
        write_gguf(gpt2, tokenizer, tmp_path / "gpt2.gguf")


def test_the_adapter_gguf_adds_up_to_the_merged_weights(adapted, tmp_path):
    """llama.cpp applies base + (alpha / rank) * B @ A per weight: computed from the adapter GGUF and the
    base's, that is the merged model's GGUF, tensor by tensor (names, q/k permutation, scaling)."""
    import gguf

    from lora_app.inference.gguf_export import write_adapter_gguf
    from lora_app.lora import set_active_adapters

    model, tokenizer = adapted
    adapter = gguf.GGUFReader(write_adapter_gguf(model, "mine", tmp_path / "mine.gguf"))
    merged = gguf.GGUFReader(write_gguf(model, tokenizer, tmp_path / "merged.gguf", gguf_type="f32"))
    set_active_adapters(model, None)
    try:
        base = gguf.GGUFReader(write_gguf(model, tokenizer, tmp_path / "base.gguf", gguf_type="f32"))
    finally:
        set_active_adapters(model, "mine")
    assert adapter.fields["general.type"].contents() == "adapter"
    scale = adapter.fields["adapter.lora.alpha"].contents() / 4  # rank 4
    lora = {t.name: t.data for t in adapter.tensors}
    merged_weights, base_weights = ({t.name: t.data for t in r.tensors} for r in (merged, base))
    names = {name[: -len(".lora_a")] for name in lora if name.endswith(".lora_a")}
    assert len(names) == 30 * 7  # every linear layer of every block
    for name in names:
        rebuilt = base_weights[name] + scale * (lora[f"{name}.lora_b"] @ lora[f"{name}.lora_a"])
        assert abs(rebuilt - merged_weights[name]).max() < 1e-4, name


@pytest.mark.parametrize("gguf_type", ["bf16", "q5_1", "q4_0", "f32"])
def test_every_type_reads_back(tmp_path, gguf_type):
    """Each type the gguf package writes loads in transformers' GGUF reader, within its rounding."""
    folder = save_tiny("llama", tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    path = write_gguf(model, tokenizer, tmp_path / f"tiny-{gguf_type}.gguf", gguf_type=gguf_type)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 8, 23]])
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    tolerance = {"f32": 1e-5, "bf16": 0.05, "q5_1": 0.2, "q4_0": 0.5}[gguf_type]
    assert (want - got).abs().max() < tolerance * want.abs().max()

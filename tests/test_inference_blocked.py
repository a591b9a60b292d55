"""Generation from blocked bf16 weights (``inference.blocked``), the CPU-with-native-bf16 path of the
inference engine: which layers it groups, that the engine uses it only where the CPU runs it, and that
every mode computes what the LoRA wrappers compute, as exactly as bf16 allows.

The products themselves need oneDNN's bf16 kernels (AVX512-BF16 or AMX); on other CPUs those tests
cannot run and say so."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_tiny, tiny_model
from test_inference_support import GREEDY, make_adapter
from lora_app.inference import InferenceEngine, Mode, blocked
from lora_app.inference.blocked import BlockedLinear, TokenStep, blocked_weights
from lora_app.inference.decode import TokenLoop
from lora_app.lora import load_adapter, merge_adapters, set_active_adapters, unmerge_adapters

needs_kernels = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                   reason="oneDNN's bf16 products need a CPU with AVX512-BF16 or AMX")


def test_layers_that_read_the_same_input_form_one_group():
    model = tiny_model("qwen2").to(torch.bfloat16)
    groups = blocked_weights(model)
    layer = model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    assert attention.q_proj.group is attention.k_proj.group is attention.v_proj.group
    assert mlp.gate_proj.group is mlp.up_proj.group and mlp.down_proj.group is not mlp.up_proj.group
    assert [m.columns for m in attention.q_proj.group.members] == [
        slice(0, 64), slice(64, 96), slice(96, 128)]  # q, then k and v at 2 of 4 heads
    n_layers = len(model.model.layers)
    assert len(groups) == 4 * n_layers + 1  # qkv, o, gate-up, down; the output layer
    assert all(type(m) is BlockedLinear for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_fp32_layers_are_left_alone():
    model = tiny_model("llama")
    assert blocked_weights(model) == [] and not any(isinstance(m, BlockedLinear) for m in model.modules())


@pytest.mark.parametrize("runs", [True, False])
def test_the_engine_blocks_bf16_weights_only_where_the_cpu_runs_them(tmp_path, monkeypatch, runs):
    """Faked both ways, so each kind of machine tests both choices (nothing is computed here)."""
    folder = save_tiny("llama", tmp_path / "tiny")
    monkeypatch.setattr(blocked, "supported", lambda: runs)
    base = InferenceEngine(device="cpu", dtype=torch.bfloat16, work_dir=tmp_path / "w").base(str(folder))
    assert isinstance(base.model.model.layers[0].mlp.up_proj, BlockedLinear) == runs


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits.float()


@needs_kernels
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q, k and v have biases
def test_every_mode_computes_what_the_wrappers_compute(tmp_path, kind):
    """Each mode's logits from the blocked engine against the same adapters on an fp32 model: no
    further off than the plain bf16 model with the LoRA wrappers is. Switching to merged and back
    rewrites the weights, so the blocked copies must follow."""
    folder = save_tiny(kind, tmp_path / kind)
    a = make_adapter(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "a", 1)
    b = make_adapter(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "b", 2)
    base = InferenceEngine(device="cpu", dtype=torch.bfloat16, work_dir=tmp_path / "w").base(str(folder))
    assert isinstance(base.model.model.layers[0].self_attn.q_proj, BlockedLinear)
    names = base.load_adapter(a), base.load_adapter(b)
    references = {dtype: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
                  for dtype in (torch.float32, torch.bfloat16)}
    for reference in references.values():
        load_adapter(reference, a, names[0])
        load_adapter(reference, b, names[1])
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    modes = [Mode.of(None), Mode.of(names[0]), Mode.of({names[0]: 0.6, names[1]: 0.4}),
             Mode.of(names[0], merged=True), Mode.of(names[1]), Mode.of(None)]
    for mode in modes:
        base.set_mode(mode)
        with base._lock:
            restore = base._locked_ready()
            got = logits(base.model, ids)
            restore()
        for reference in references.values():
            set_active_adapters(reference, mode.adapters)
        truth, wrappers = logits(references[torch.float32], ids), logits(references[torch.bfloat16], ids)
        assert (got - truth).abs().max() <= 2 * (wrappers - truth).abs().max() + 1e-3, mode.label
    assert torch.equal(logits(base.model, ids), got)  # the wrappers are back and nothing is added twice


@needs_kernels
def test_a_weight_written_in_place_is_blocked_again():
    model = tiny_model("llama").to(torch.bfloat16)
    blocked_weights(model)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(1, 3, layer.in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        layer(x)
        with torch.no_grad():
            layer.weight.mul_(2)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight))


def generated_logits(base, mode, monkeypatch, short_way: bool) -> tuple[list[torch.Tensor], list]:
    """Every token's logits of a 12-token greedy reply in ``mode``, and the steps the loop took."""
    seen, steps = [], []
    next_token = TokenLoop._next
    after_prompt = TokenStep.after_prompt.__func__

    def spy_next(self, logits, *args):
        seen.append(logits.float().clone())
        return next_token(self, logits, *args)

    def spy_after_prompt(cls, *args):
        steps.append(after_prompt(cls, *args) if short_way else None)
        return steps[-1]

    monkeypatch.setattr(TokenLoop, "_next", spy_next)
    monkeypatch.setattr(TokenStep, "after_prompt", classmethod(spy_after_prompt))
    base.generate("hello there", settings=GREEDY.with_(max_new_tokens=12, min_new_tokens=12), mode=mode)
    monkeypatch.undo()
    return seen, steps


@needs_kernels
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tokens_after_the_prompt_take_the_short_way_to_the_same_logits(tmp_path, kind, monkeypatch):
    folder = save_tiny(kind, tmp_path / kind)
    a = make_adapter(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "a", 1)
    dora = make_adapter(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "dora", 2, variant="dora")
    base = InferenceEngine(device="cpu", dtype=torch.bfloat16, work_dir=tmp_path / "w").base(str(folder))
    a, dora = base.load_adapter(a), base.load_adapter(dora)
    for mode in (None, Mode.of(a), Mode.of(a, merged=True), Mode.of(dora)):
        short, steps = generated_logits(base, mode, monkeypatch, short_way=True)
        assert (steps[0] is not None) == (mode != Mode.of(dora))  # a DoRA wrapper stays: the model's own forward
        plain, _ = generated_logits(base, mode, monkeypatch, short_way=False)
        assert len(short) == len(plain) == 12
        for got, expected in zip(short, plain):
            torch.testing.assert_close(got[:, -1], expected[:, -1], rtol=0, atol=0)


@needs_kernels
def test_other_model_kinds_keep_their_own_forward(tmp_path, monkeypatch):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    base = InferenceEngine(device="cpu", dtype=torch.bfloat16, work_dir=tmp_path / "w").base(str(folder))
    _, steps = generated_logits(base, None, monkeypatch, short_way=True)
    assert steps == [None]

"""The LoRA core on tiny random models: exactness, gradients, switching, mixing, saving, variants."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import tiny_model
from lora_app.lora import (VARIANTS, AdapterLoadError, DeltaLoraUpdater, LoraAdapter, LoraConfig, LoraConfigError, LoraLayer,
                           TargetError, adapter_modules, add_adapter, bypass_idle, count_parameters, export_merged, load_adapter,
                           lora_layers, merge_adapters, pack_adapters, param_groups, remove_adapter, resolve_targets, save_adapter,
                           set_active_adapters, set_trainable, unmerge_adapters)
from lora_app.lora.functional import Rebuild, dropout, keep_mask, lora_forward, lora_forward_shared, new_seed


def randomize(model, name, scale=0.2, seed=0):
    """Give an adapter non-trivial weights (B starts at zero, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapter_modules(model, name).values():
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}


# ---------------------------------------------------------------------------------------- config
def test_bad_settings_are_all_reported_before_anything_is_built():
    with pytest.raises(LoraConfigError) as err:
        LoraConfig(rank=0, alpha=-1, dropout=1.0, variant="qlora-xl")
    message = str(err.value)
    for part in ("rank must", "alpha", "dropout", "unknown variant 'qlora-xl'"):
        assert part in message
    with pytest.raises(LoraConfigError, match="dropout"):
        LoraConfig(dropout=-0.1)


def test_scaling_per_variant():
    assert LoraConfig(rank=16, alpha=32).scaling == 2.0
    assert LoraConfig(rank=16, alpha=32, variant="rslora").scaling == 8.0
    assert LoraConfig(rank=16, alpha=32, variant="vera").scaling == 1.0


def test_rank4_on_512x64_trains_2304_of_32768():
    model = nn.Sequential(nn.Linear(64, 512, bias=False))
    add_adapter(model, LoraConfig(rank=4, alpha=8, targets=["0"]))
    trainable, total = count_parameters(model)
    assert trainable == 2304 and total == 32768 + 2304


# --------------------------------------------------------------------------------------- targets
def test_targets_names_regex_all_linear_and_defaults():
    model = tiny_model("llama")
    assert len(resolve_targets(model, ["q_proj", "v_proj"])) == 4
    assert resolve_targets(model, "q_proj,v_proj") == resolve_targets(model, ["q_proj", "v_proj"])
    assert resolve_targets(model, r"model\.layers\.0\..*_proj") == [
        f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    all_linear = resolve_targets(model, "all-linear")
    assert "lm_head" not in all_linear and len(all_linear) == 14
    assert resolve_targets(model, None) == all_linear  # llama default: attention + MLP projections
    gpt2 = tiny_model("gpt2")
    assert "transformer.h.0.attn.c_attn" in resolve_targets(gpt2, None)
    assert "lm_head" not in resolve_targets(gpt2, "all-linear")


def test_unknown_target_lists_the_linear_modules():
    with pytest.raises(TargetError) as err:
        resolve_targets(tiny_model("llama"), ["query"])
    assert "q_proj" in str(err.value) and "down_proj" in str(err.value)
    with pytest.raises(TargetError, match="not found"):
        resolve_targets(tiny_model("llama"), ["q_proj", "qq_proj"])
    with pytest.raises(TargetError, match="regular expression"):
        resolve_targets(tiny_model("llama"), "(unclosed")


# ------------------------------------------------------------------------------- core behaviour
@pytest.mark.parametrize("variant", VARIANTS)
def test_new_adapter_leaves_the_model_unchanged(model_kind, variant, input_ids):
    model = tiny_model(model_kind)
    before = logits(model, input_ids)
    add_adapter(model, LoraConfig(rank=4, alpha=8, variant=variant, targets="all-linear"))
    assert torch.equal(logits(model, input_ids), before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_only_adapter_parameters(model_kind, variant, input_ids):
    model = tiny_model(model_kind).train()
    add_adapter(model, LoraConfig(rank=4, alpha=8, variant=variant, dropout=0.1))
    randomize(model, "default")  # B = 0 would zero A's gradient
    model(input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        in_adapter = ".adapters.default." in name
        frozen_by_design = variant == "lora-fa" and ".lora_A." in name
        if in_adapter and not frozen_by_design:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_and_unmerge_are_exact(model_kind, variant, input_ids):
    model = tiny_model(model_kind)
    original = base_state(model)
    add_adapter(model, LoraConfig(rank=4, alpha=8, variant=variant))
    randomize(model, "default")
    unmerged = logits(model, input_ids)
    assert (unmerged - logits(tiny_model(model_kind), input_ids)).abs().max() > 1e-3  # it does something
    merge_adapters(model)
    assert (logits(model, input_ids) - unmerged).abs().max() < 1e-5
    unmerge_adapters(model)
    assert (logits(model, input_ids) - unmerged).abs().max() < 1e-5
    for key, value in base_state(model).items():
        assert (value - original[key.replace(".base_layer", "")]).abs().max() < 1e-5, key


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(model_kind, variant, input_ids, tmp_path):
    model = tiny_model(model_kind)
    add_adapter(model, LoraConfig(rank=4, alpha=8, variant=variant), "mine")
    randomize(model, "mine")
    expected = logits(model, input_ids)
    save_adapter(model, "mine", tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    fresh = tiny_model(model_kind)
    config = load_adapter(fresh, tmp_path / "adapter", "again")
    assert config.variant == variant
    assert all(layer.active == {"again": 1.0} for layer in lora_layers(fresh).values())
    assert torch.equal(logits(fresh, input_ids), expected)


def test_switching_never_touches_the_base(input_ids):
    model = tiny_model("llama")
    base = logits(model, input_ids)
    add_adapter(model, LoraConfig(rank=4, variant="lora"), "a")
    add_adapter(model, LoraConfig(rank=8, variant="dora", targets=["q_proj", "v_proj"]), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    weights = base_state(model)
    set_active_adapters(model, "a")
    out_a = logits(model, input_ids)
    set_active_adapters(model, "b")
    out_b = logits(model, input_ids)
    set_active_adapters(model, None)
    assert torch.equal(logits(model, input_ids), base)
    set_active_adapters(model, "a")
    assert torch.equal(logits(model, input_ids), out_a)
    assert not torch.allclose(out_a, out_b)
    for key, value in base_state(model).items():
        assert torch.equal(value, weights[key])
    with pytest.raises(KeyError, match="unknown adapter"):
        set_active_adapters(model, "c")
    remove_adapter(model, "b")
    assert all("b" not in layer.adapters for layer in lora_layers(model).values())


def test_weighted_mix_of_different_ranks_and_variants():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32))
    add_adapter(model, LoraConfig(rank=2, targets=["0"]), "a")
    add_adapter(model, LoraConfig(rank=6, targets=["0"], variant="dora"), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    x = torch.randn(5, 16)
    with torch.no_grad():
        base = model[0].base_layer(x)
        set_active_adapters(model, "a")
        delta_a = model(x) - base
        set_active_adapters(model, "b")
        delta_b = model(x) - base
        set_active_adapters(model, {"a": 0.7, "b": 0.3})
        mixed = model(x)
        assert torch.allclose(mixed, base + 0.7 * delta_a + 0.3 * delta_b, atol=1e-6)
        merge_adapters(model)
        assert torch.allclose(model(x), mixed, atol=1e-5)
        unmerge_adapters(model)
        assert torch.allclose(model(x), mixed, atol=1e-6)


def test_weighted_mix_merge_on_a_real_model(input_ids):
    model = tiny_model("qwen2")
    add_adapter(model, LoraConfig(rank=4), "a")
    add_adapter(model, LoraConfig(rank=2, variant="vera", targets=["q_proj", "o_proj"]), "b")
    randomize(model, "a")
    randomize(model, "b")
    set_active_adapters(model, {"a": 0.5, "b": 1.5})
    mixed = logits(model, input_ids)
    merge_adapters(model)
    assert (logits(model, input_ids) - mixed).abs().max() < 1e-5
    set_active_adapters(model, {"a": 0.5, "b": 1.5})  # leaving merged mode is exact
    assert (logits(model, input_ids) - mixed).abs().max() < 1e-5


def test_a_packed_mix_computes_what_the_adapters_compute(input_ids):
    model = tiny_model("llama").eval()
    add_adapter(model, LoraConfig(rank=4), "a")
    add_adapter(model, LoraConfig(rank=2, alpha=8, variant="rslora"), "b")
    add_adapter(model, LoraConfig(rank=3, variant="lora-fa"), "c")
    add_adapter(model, LoraConfig(rank=2, variant="dora", targets=["q_proj"]), "d")
    for seed, name in enumerate("abcd"):
        randomize(model, name, seed=seed)
    layers = list(lora_layers(model).values())
    for mix in ({"a": 1.0}, {"a": 0.7, "b": -0.4, "c": 1.3}, {"a": 0.5, "d": 0.5}):
        set_active_adapters(model, mix)
        expected = logits(model, input_ids)
        pack_adapters(model)
        packable = [layer.active and "d" not in layer.active for layer in layers]  # DoRA's layers stay as they are
        assert [layer.packed is not None for layer in layers] == packable and any(packable)
        assert (logits(model, input_ids) - expected).abs().max() < 1e-5
    set_active_adapters(model, "b")  # a new mix drops the packs, as does removing an adapter
    assert all(layer.packed is None for layer in layers)
    pack_adapters(model)
    remove_adapter(model, "b")
    assert all(layer.packed is None for layer in layers)
    model.train()  # training never uses a pack: gradients reach the adapters
    set_active_adapters(model, "a")
    set_trainable(model, "a")
    pack_adapters(model)
    model(input_ids).logits.sum().backward()
    assert all(m.lora_B.weight.grad is not None for m in adapter_modules(model, "a").values())


def test_a_packed_pair_in_the_models_dtype_adds_into_the_base_output():
    """Where x, the pack and the base output share a dtype (bf16 on a GPU), the pair runs as one
    product and one add-product into the base output: the logits are those of the adapters unpacked."""
    model = tiny_model("llama").to(torch.bfloat16).eval()
    add_adapter(model, LoraConfig(rank=4), "a")
    randomize(model, "a")
    for module in adapter_modules(model, "a").values():
        module.to(torch.bfloat16)
    set_active_adapters(model, "a")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits.float()
        pack_adapters(model)
        assert all(layer.packed[0].dtype == torch.bfloat16 for layer in lora_layers(model).values())
        got = model(ids).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


# ------------------------------------------------------------------------------------ variants
def test_lora_plus_groups_put_b_at_ratio():
    model = tiny_model("llama")
    add_adapter(model, LoraConfig(rank=4, variant="dora"))
    groups = param_groups(model, "default", lr=1e-4, lora_plus_ratio=16)
    slow, fast = groups
    assert slow["lr"] == 1e-4 and fast["lr"] == pytest.approx(1.6e-3)
    assert all(p.shape[0] == 4 for p in slow["params"])  # lora_A: (r, in)
    assert len(fast["params"]) == 2 * len(slow["params"])  # lora_B and the magnitude per layer
    assert len(param_groups(model, "default", lr=1e-4)) == 1


def test_lora_fa_trains_only_b(input_ids):
    model = tiny_model("llama")
    add_adapter(model, LoraConfig(rank=4, variant="lora-fa"))
    a_before = {k: v.lora_A.weight.clone() for k, v in adapter_modules(model, "default").items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for key, adapter in adapter_modules(model, "default").items():
        assert torch.equal(adapter.lora_A.weight, a_before[key])
        assert adapter.lora_B.weight.abs().sum() > 0


def test_delta_lora_moves_the_base_and_its_effect_survives_saving(input_ids, tmp_path):
    model = tiny_model("llama").train()
    pristine = base_state(model)
    add_adapter(model, LoraConfig(rank=4, alpha=8, variant="delta-lora", delta_lambda=0.5))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    updater = DeltaLoraUpdater(model, "default", opt)
    for _ in range(3):
        model(input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    updater.remove()
    model.eval()
    trained = logits(model, input_ids)
    moved = base_state(model)["model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert (moved - pristine["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-4
    save_adapter(model, "default", tmp_path / "delta")
    fresh = tiny_model("llama")  # the original base: the saved adapter alone reproduces the trained model
    load_adapter(fresh, tmp_path / "delta")
    assert (logits(fresh, input_ids) - trained).abs().max() < 1e-4


def test_vera_shares_one_frozen_projection(input_ids):
    model = tiny_model("llama")
    add_adapter(model, LoraConfig(rank=4, variant="vera"))
    adapters = list(adapter_modules(model, "default").values())
    assert len({id(a.projection) for a in adapters}) == 1
    trainable, _ = count_parameters(model)
    assert trainable == sum(a.vera_lambda_d.numel() + a.vera_lambda_b.numel() for a in adapters)


# ------------------------------------------------------------------------------------ bad input
def test_adapter_for_another_base_names_the_tensor_and_shapes(tmp_path, input_ids):
    model = tiny_model("llama")
    add_adapter(model, LoraConfig(rank=4))
    save_adapter(model, "default", tmp_path / "a")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    before = logits(other, input_ids)
    with pytest.raises(AdapterLoadError) as err:
        load_adapter(other, tmp_path / "a")
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in str(err.value)
    assert "(4, 64)" in str(err.value) and "(4, 32)" in str(err.value)
    assert not lora_layers(other) and torch.equal(logits(other, input_ids), before)  # untouched
    with pytest.raises(AdapterLoadError, match="another base model"):
        load_adapter(tiny_model("gpt2"), tmp_path / "a")


def test_pickle_and_corrupt_adapters_are_refused(tmp_path):
    model = tiny_model("llama")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickled" / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="pickle"):
        load_adapter(model, tmp_path / "pickled")
    add_adapter(model, LoraConfig(rank=4), "good")
    save_adapter(model, "good", tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterLoadError, match="not a readable safetensors"):
        load_adapter(model, tmp_path / "corrupt", "bad")
    assert all(layer.active == {"good": 1.0} for layer in lora_layers(model).values())
    with pytest.raises(AdapterLoadError, match="already has an adapter"):
        save_adapter(model, "good", tmp_path / "again")
        load_adapter(model, tmp_path / "again", "good")


def test_saving_replaces_atomically(tmp_path):
    model = tiny_model("llama")
    add_adapter(model, LoraConfig(rank=4))
    target = tmp_path / "out"
    save_adapter(model, "default", target)
    randomize(model, "default")
    save_adapter(model, "default", target)  # a second save replaces the folder whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_merged_loads_with_plain_transformers(kind, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    model = tiny_model(kind)
    add_adapter(model, LoraConfig(rank=4, variant="dora"))
    randomize(model, "default")
    expected = logits(model, input_ids)
    export_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert (logits(plain, input_ids) - expected).abs().max() < 1e-5
    assert not lora_layers(plain) and lora_layers(model)  # the source model keeps its adapters


def test_lora_core_imports_no_transformers_peft_or_gradio():
    code = ("import sys, lora_app.lora; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'gradio')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_adapters_added_to_an_eval_model_start_in_eval_mode(input_ids):
    """Dropout must not fire at inference: an adapter loaded for chat gives the same output twice."""
    from conftest import tiny_model
    from lora_app.lora import LoraConfig, add_adapter

    model = tiny_model("llama")  # eval mode
    add_adapter(model, LoraConfig(rank=4, alpha=8, dropout=0.5), "mine")
    for module in model.modules():
        assert not module.training
    model.train()
    assert all(module.training for module in model.modules())


@pytest.mark.parametrize("shape", [(3, 7, 5), (4096,), (2, 1001)])  # sizes that are and are not multiples of 4
def test_dropout_drops_p_of_the_input_and_scales_the_rest(shape):
    from lora_app.lora.adapters import Dropout

    torch.manual_seed(0)
    dropout = Dropout(0.25).train()
    x = torch.ones(shape, requires_grad=True)
    y = dropout(x)
    assert y.shape == x.shape
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the gradient passes exactly where the input did
    draws = torch.cat([(dropout(torch.ones(100_000)) == 0).float() for _ in range(10)])
    assert abs(draws.mean().item() - 0.25) < 0.005
    assert not torch.equal(dropout(x), dropout(x))  # a new mask every call
    assert torch.equal(dropout.eval()(x), x)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("x_grad", [True, False])
def test_the_lora_node_has_the_gradients_of_the_plain_expression(p, x_grad):
    """LoraFunction against autograd through ``base + s * B A dropout(x)``, with the same mask (its
    seed comes from torch's generator, so reseeding repeats it); and A's and B's gradients when
    only some inputs need one (LoRA-FA's frozen A, a first layer's input)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=x_grad)
    base = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 7, dtype=torch.float64)
    torch.manual_seed(1)
    out = lora_forward(base, x, a, b, 0.5, p)
    after_forward = torch.get_rng_state()
    grads = torch.autograd.grad(out, [t for t in (base, x, a, b) if t.requires_grad], g)
    assert torch.equal(torch.get_rng_state(), after_forward)  # redrawing the mask moved no one's generator
    torch.manual_seed(1)
    dropped = dropout(x.reshape(-1, 12), p, new_seed()).view(x.shape) if p else x
    expected = base + (dropped @ a.T * 0.5) @ b.T
    want = torch.autograd.grad(expected, [t for t in (base, x, a, b) if t.requires_grad], g)
    assert torch.allclose(out, expected)
    for got, ref in zip(grads, want):
        assert torch.allclose(got, ref)
    frozen_a = a.detach()
    out = lora_forward(base, x, frozen_a, b, 0.5, p)
    assert torch.autograd.grad(out, b, g)[0].shape == b.shape


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_a_dropout_mask_drops_p_and_is_drawn_again_from_its_seed(p):
    """A CPU mask of 256k elements drops p of them (to within 6 standard deviations), its scale keeps
    the expectation, and its seed alone decides it."""
    keep, scale = keep_mask((256, 1000), torch.device("cpu"), p, seed=7)
    assert keep.dtype == torch.uint8 and set(keep.unique().tolist()) == {0, 1}
    dropped = 1 - keep.double().mean().item()
    assert abs(dropped - p) < 6 * (p * (1 - p) / keep.numel()) ** 0.5
    assert scale == pytest.approx(1 / (1 - p), rel=1e-4)
    assert torch.equal(keep_mask((256, 1000), torch.device("cpu"), p, seed=7)[0], keep)
    assert not torch.equal(keep_mask((256, 1000), torch.device("cpu"), p, seed=8)[0], keep)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("x_grad", [True, False])
def test_adapters_sharing_an_input_run_as_one_node_with_each_ones_gradients(p, x_grad):
    """k adapters on one x (q, k and v: outputs of different widths, ranks that differ) as one node: each
    output and every gradient is that of the plain expression, the k adapters sharing one dropout mask
    drawn from the node's seed; LoRA-FA's frozen A's get none."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=x_grad)
    widths = (7, 3, 3)
    bases = [torch.randn(2, 5, w, dtype=torch.float64, requires_grad=True) for w in widths]
    ranks = (4, 4, 2)
    a = [torch.randn(r, 12, dtype=torch.float64, requires_grad=True) for r in ranks]
    b = [torch.randn(w, r, dtype=torch.float64, requires_grad=True) for w, r in zip(widths, ranks)]
    g = [torch.randn(2, 5, w, dtype=torch.float64) for w in widths]
    inputs = [t for t in (x, *bases, *a, *b) if t.requires_grad]
    torch.manual_seed(1)
    outs = lora_forward_shared(torch.cat(bases, -1), x, a, b, 0.5, p)
    grads = torch.autograd.grad(outs, inputs, g)
    torch.manual_seed(1)
    dropped = x
    if p:
        keep, scale = keep_mask((10, 12), x.device, p, new_seed())
        dropped = (x.reshape(-1, 12) * keep * scale).view(x.shape)
    expected = [base + (dropped @ a_i.T * 0.5) @ b_i.T for base, a_i, b_i in zip(bases, a, b)]
    for out, want in zip(outs, expected):
        assert torch.allclose(out, want)
    for got, want in zip(grads, torch.autograd.grad(expected, inputs, g)):
        assert torch.allclose(got, want)
    frozen = [t.detach() for t in a]
    outs = lora_forward_shared(torch.cat(bases, -1), x, frozen, b, 0.5, p)
    assert [t.shape for t in torch.autograd.grad(outs, b, g)] == [t.shape for t in b]


def test_a_rebuilt_input_gives_the_gradients_of_the_kept_one_unless_changed_in_place():
    """An input carrying a Rebuild is computed again in the backward pass, once for all its users;
    changed in place after it was attached, the Rebuild no longer describes it and the node keeps it."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    base = torch.zeros(6, 5, dtype=torch.float64)
    calls = []

    def twice(t):
        calls.append(1)
        return t * 2

    for change_in_place in (False, True):
        calls.clear()
        y = Rebuild(twice, x).attach(x * 2)
        if change_in_place:
            y.add_(1)
        out = sum(lora_forward(base, y, a, b, 0.5, 0.0) for _ in range(3))  # three users, as q, k and v
        got = torch.autograd.grad(out.sum(), (x, a, b))
        expected_y = x * 2 + (1 if change_in_place else 0)
        want = torch.autograd.grad(sum(base + (expected_y @ a.T * 0.5) @ b.T for _ in range(3)).sum(), (x, a, b))
        for g, w in zip(got, want):
            assert torch.allclose(g, w)
        assert len(calls) == (0 if change_in_place else 1)


def test_a_bf16_layer_keeps_its_input_once_not_a_copy_per_adapter():
    """Under bf16 autocast with fp32 adapters, q, k and v of one input keep that input (shared), not an
    fp32 copy each (what made adapter activations most of a step's memory), and no dropout mask: the
    backward pass draws it again. The gradients are those of the masks the forward pass drew."""
    torch.manual_seed(0)
    layers = [LoraLayer(nn.Linear(64, 64, bias=False).to(torch.bfloat16)) for _ in range(3)]
    for layer in layers:
        layer.adapters["a"] = LoraAdapter(64, 64, LoraConfig(rank=4, alpha=8, dropout=0.1))
        layer.active = {"a": 1.0}
        layer.train()
    x = torch.randn(256, 64, dtype=torch.bfloat16, requires_grad=True)
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        sum(layer(x).float().sum() for layer in layers).backward()
    # x once (bf16), and what is small or kept anyway: the base weights (bf16, for x's gradient),
    # h (256 x r, bf16) and the fp32 factors A and B
    expected = x.numel() * 2 + 3 * (64 * 64 * 2 + 256 * 4 * 2 + 2 * 4 * 64 * 4)
    assert sum(kept.values()) <= expected
    assert x.grad is not None and all(layer.adapters["a"].lora_A.weight.grad is not None for layer in layers)


def test_idle_wrappers_step_aside_and_come_back(input_ids):
    """bypass_idle puts back the original layer wherever a wrapper has nothing to add: the model then
    computes the same logits without the wrappers' calls; the restore puts the same wrappers back."""
    model = tiny_model("llama")
    add_adapter(model, LoraConfig(rank=4, alpha=8, targets="q_proj"), "q")
    add_adapter(model, LoraConfig(rank=4, alpha=8, targets="all-linear"), "all")
    randomize(model, "q")
    randomize(model, "all", seed=1)
    wrappers = lora_layers(model)
    q_paths = {path for path, layer in wrappers.items() if "q" in layer.adapters}
    set_active_adapters(model, "q")
    expected = logits(model, input_ids)
    restore = bypass_idle(model)
    assert set(lora_layers(model)) == q_paths  # only the layers "q" acts on keep a wrapper
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=0)
    restore()
    assert lora_layers(model) == wrappers
    set_active_adapters(model, "all")
    merge_adapters(model)
    expected = logits(model, input_ids)
    restore = bypass_idle(model, wrappers)
    assert lora_layers(model) == {} and type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=0)
    restore()
    assert lora_layers(model) == wrappers

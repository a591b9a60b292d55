"""The training engine: settings checks, the loop, checkpoints and exact resume, the loss, batching."""

import json
import math

import pytest
import torch

from conftest import adapter_grads, adapter_grads_plain_and_fused, save_tiny, tiny_model
from lora_app.training.batches import padding_share, plan_batches
from lora_app.errors import TrainConfigError, TrainingError
from lora_app.hardware import choose_precision
from lora_app.training.config import TrainConfig
from lora_app.training.loss import linear_cross_entropy, reference_cross_entropy
from lora_app.training.trainer import Callbacks, train

QA = [("What is the capital of France?", "Paris."), ("Say hi.", "Hi!"), ("2+2?", "4"),
      ("Name a color.", "Blue."), ("Opposite of up?", "Down."), ("A fruit?", "An apple."),
      ("Sky color?", "Blue."), ("A pet?", "A cat.")]


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.json"
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA * 4]
    path.write_text(json.dumps(rows))
    return str(path)


def config_for(model, data, output, **overrides):
    values = dict(model=model, data=data, output=str(output), rank=4, alpha=8, dropout=0.0, batch_size=4,
                  seq_len=96, max_steps=4, lr=1e-2, warmup=0, scheduler="linear", seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def same_update_rel() -> float:
    """Relative tolerance between the losses of runs that compute the same updates in other micro-batches.
    In fp32 the sums agree to 1e-5; where precision auto picks bf16 (a CPU with native bf16), every
    micro-batch's products round to 8 bits and the sums part by up to 5e-5 (AVX512-BF16 EPYC)."""
    return 1e-5 if choose_precision("auto", "cpu").name == "fp32" else 1e-3


def quiet(**kwargs):
    logged = []
    return Callbacks(on_log=lambda step, values: logged.append((step, values)), log=lambda text: None, **kwargs), logged


# ---- settings ---------------------------------------------------------------------------------
def test_every_invalid_setting_is_listed_at_once():
    config = TrainConfig(data="x.json", output="out", rank=0, lr=0, batch_size=0, variant="mystery")
    with pytest.raises(TrainConfigError) as err:
        config.validate()
    message = str(err.value)
    for words in ("rank", "learning rate", "batch size", "unknown variant 'mystery'"):
        assert words in message


def test_config_file_and_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rank: 16\nalpha: 32\nvariant: dora\nseq-len: 256\n")
    config = TrainConfig.from_file(path)
    assert (config.rank, config.alpha, config.variant, config.seq_len) == (16, 32, "dora", 256)
    path.write_text("rnak: 3\n")
    with pytest.raises(TrainConfigError, match="rnak"):
        TrainConfig.from_file(path)


def test_sequence_length_beyond_the_model_is_refused_before_loading(tiny_llama, qa_data, tmp_path, monkeypatch):
    import lora_app.models

    monkeypatch.setattr(lora_app.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(TrainConfigError, match="beyond the model's maximum of 128"):
        train(config_for(tiny_llama, qa_data, tmp_path / "run", seq_len=4096), quiet()[0])


def test_every_setting_is_declared_once_and_derived_everywhere(monkeypatch):
    from dataclasses import fields

    from lora_app.training.cli import parser
    from lora_app.ui.form import FIELDS, OFF_PAGE

    names = [f.name for f in fields(TrainConfig)]
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal width: keep each help on one line
    help_text = " ".join(parser().format_help().split())
    for f in fields(TrainConfig):  # every setting on the command line, with its meaning and its default
        spelled = f"--no-{f.name.replace('_', '-')}" if f.default is True else f"--{f.name.replace('_', '-')}"
        assert spelled in help_text, f.name
        assert " ".join(f.metadata["help"].split()) in help_text, f.name
    assert "(default: 512)" in help_text and "(required)" in help_text
    assert set(FIELDS) - {"all_linear"} == set(names) - OFF_PAGE  # the page edits the rest
    lora = TrainConfig(rank=4, alpha=8, variant="dora", targets="q_proj", model="m").lora_config()
    assert (lora.rank, lora.alpha, lora.variant, lora.targets, lora.base_model_name_or_path) == (4, 8, "dora", "q_proj", "m")


def test_settings_import_without_torch():
    import subprocess
    import sys

    code = "import sys, lora_app.training.config; assert 'torch' not in sys.modules, 'torch was imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_problems_are_keyed_by_setting():
    problems = TrainConfig(rank=0, dropout=1.5, quantization="4bit", variant="delta-lora", max_steps=2,
                           epochs=0).problems()
    assert set(problems) == {"data", "output", "rank", "dropout", "quantization"}  # epochs unused with max_steps
    with pytest.raises(TrainConfigError) as err:
        TrainConfig(data="d", output="o", rank=0).validate()
    assert list(err.value.problems) == ["rank"] and str(err.value).startswith("Invalid training settings:")


def test_preflight_reports_settings_and_model_limits_together(tiny_llama, tmp_path):
    from lora_app.training.trainer import preflight

    with pytest.raises(TrainConfigError) as err:
        preflight(TrainConfig(model=tiny_llama, data="d.json", output=str(tmp_path / "run"), lr=-1, seq_len=4096))
    assert set(err.value.problems) == {"lr", "seq_len", "data"}  # d.json does not exist
    assert "maximum of 128" in str(err.value) and "learning rate" in str(err.value)


def test_cli_lists_problems_and_exits_2(capsys):
    from lora_app.training.cli import main

    assert main(["train", "--data", "d.json", "--output", "o", "--rank", "0", "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "rank must be" in err and "learning rate must be" in err


# ---- precision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, gpu, gpu_bf16, expected", [
    ({"avx2", "fma"}, False, False, "fp32"),                   # AVX2 only: emulated bf16 is slower than fp32
    ({"avx512f", "avx512bw", "avx512vl"}, False, False, "fp32"),  # AVX512 without BF16 reads "AVX512" too
    ({"avx512f", "avx512_bf16"}, False, False, "bf16"),        # AMD Zen 4, Intel Cooper Lake
    ({"avx512f", "amx_bf16", "amx_tile"}, False, False, "bf16"),  # Intel Sapphire Rapids
    (set(), True, True, "bf16"),                               # Ampere and later
    (set(), True, False, "fp16"),                              # older GPUs
])
def test_auto_precision_follows_what_the_machine_computes(monkeypatch, flags, gpu, gpu_bf16, expected):
    from lora_app import hardware

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    chosen = hardware.choose_precision("auto", "cuda" if gpu else "cpu")
    assert chosen.name == expected and chosen.reason
    assert hardware.choose_precision("fp32", "cpu").name == "fp32"


def test_bf16_run_keeps_the_base_in_bf16_and_the_adapter_in_fp32(tiny_llama, qa_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lora_app.training import trainer

    seen = {}
    real_setup = trainer.Recipe._setup_optimizer

    def spy(self):
        params = dict(self.model.named_parameters())
        seen["base"] = {p.dtype for n, p in params.items() if not p.requires_grad}
        seen["adapter"] = {p.dtype for n, p in params.items() if p.requires_grad}
        real_setup(self)

    monkeypatch.setattr(trainer.Recipe, "_setup_optimizer", spy)
    outcome = train(config_for(tiny_llama, qa_data, tmp_path / "run", precision="bf16", max_steps=3), quiet()[0])
    assert seen == {"base": {torch.bfloat16}, "adapter": {torch.float32}}
    assert outcome.summary["precision"] == "bf16" and math.isfinite(outcome.summary["final_loss"])
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert outcome.summary["memory_estimate"]["precision"] == "bf16"  # the estimate counts 2-byte weights


@pytest.mark.parametrize("name", ["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                                  "polynomial"])
def test_schedules_match_transformers(name):
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    from lora_app.training.schedule import SCHEDULES, multiplier

    assert name in SCHEDULES

    def curve(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = make(optimizer)
        lrs = []
        for _ in range(12):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return lrs

    ours = curve(lambda opt: LambdaLR(opt, lambda step: multiplier(name, step, warmup=3, total=10)))
    theirs = curve(lambda opt: get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=10))
    # polynomial: transformers decays to an absolute 1e-7, ours to 1e-7 of the peak
    assert ours == pytest.approx(theirs, abs=2e-7 if name == "polynomial" else 1e-12)


# ---- the loss ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_matches_full_logits_in_value_and_gradient(dtype):
    """Chunks of 7 rows through workspaces that every chunk reuses, with a head bias, in fp32 and in
    bf16 (products in bf16, the softmax in fp32, as the full-logits reference computes them)."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16).to(dtype).requires_grad_()
    weight, bias = torch.randn(50, 16).to(dtype), torch.randn(50).to(dtype)
    labels = torch.randint(0, 50, (3, 10))
    labels[0, :4] = -100
    labels[2, 7:] = -100
    loss, count = linear_cross_entropy(hidden, weight, labels, bias, chunk_size=7)
    loss.backward()
    fused_grad = hidden.grad.clone()
    hidden.grad = None
    reference = reference_cross_entropy(hidden @ weight.T + bias, labels)
    reference.backward()
    assert count == int((labels[:, 1:] != -100).sum())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the logits and the gradient rounded
    assert torch.allclose(loss, reference.float(), atol=tolerance * 10)
    assert torch.allclose(fused_grad.float(), hidden.grad.float(), atol=tolerance)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_fused_norms_and_mlps_give_the_same_model_in_value_and_gradient(kind):
    """fuse() swaps the one-node RMSNorm and gated MLP in where they compute exactly what the module
    does (Llama, Qwen2: every norm and MLP; GPT-2 has neither), and the model's loss and every
    gradient stay those of transformers' own modules."""
    from lora_app.training.fused import fuse

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(model):
        for p in model.parameters():
            p.grad = None
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model = tiny_model(kind)
    before = loss_and_grads(model)
    swapped = fuse(model)
    layers = model.config.num_hidden_layers if kind != "gpt2" else 0
    assert swapped == {"rms_norm": 2 * layers + (1 if layers else 0), "gated_mlp": layers, "linear_4bit": 0}
    after = loss_and_grads(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.allclose(before[name], after[name], rtol=1e-4, atol=1e-6), name


def test_fused_mlps_with_adapters_train_as_before():
    """With LoRA (dropout on) on every linear layer, the fused model's adapter gradients are those of
    the plain one under the same seed, the down projection rebuilding its input from gate and up."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    plain, fused, _ = adapter_grads_plain_and_fused(lambda: tiny_model("llama"), ids)
    assert plain.keys() == fused.keys() and any("down_proj" in name for name in fused)
    for name in plain:
        assert torch.allclose(plain[name], fused[name], rtol=1e-4, atol=1e-6), name


def test_checkpointed_layers_recompute_the_same_masks_and_rebuilds():
    """Gradient checkpointing recomputes each layer in the backward pass: the adapters' dropout masks
    (their seeds come from the generator checkpointing restores) and the rebuilt inputs must come out as
    in the forward pass, so the gradients equal those of the run that kept everything."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for grouped in (False, True):
        grads = [adapter_grads(tiny_model("llama"), ids, fused=True, checkpointing=checkpointing, grouped=grouped)[0]
                 for checkpointing in (False, True)]
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_siblings_on_one_input_train_as_one_node_with_the_same_gradients(kind):
    """Grouped, q, k and v and gate and up each run as one adapter node (4 a layer instead of 7; Qwen2's
    q, k and v have biases), their base products as one where their weights are moved side by side, and
    every adapter gradient is the ungrouped one (dropout off: grouped, the masks are drawn as one); in
    eval mode, or with an adapter that is not plain LoRA, each layer runs alone, on the same weights."""
    from lora_app.lora import LoraConfig, add_adapter, group_shared_inputs, set_active_adapters

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    alone, _ = adapter_grads(tiny_model(kind), ids, fused=True, dropout=0.0)
    for move in (None, True):  # on a CPU the base weights stay where they are unless moved
        grouped, _ = adapter_grads(tiny_model(kind), ids, fused=True, dropout=0.0, grouped=move)
        assert alone.keys() == grouped.keys()
        for name in alone:
            assert torch.allclose(alone[name], grouped[name], rtol=1e-4, atol=1e-6), name

    def lora_nodes(loss) -> int:
        seen, todo, count = set(), [loss.grad_fn], 0
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            count += type(node).__name__ == "LoraFunctionBackward"
            todo += [next_node for next_node, _ in node.next_functions]
        return count

    model = tiny_model(kind)
    add_adapter(model, LoraConfig(rank=4, alpha=8, dropout=0.1, targets="all-linear"), "a")
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    assert group_shared_inputs(model, move=True) == 2 * model.config.num_hidden_layers
    attention = model.model.layers[0].self_attn  # the base weights side by side, each layer's a view
    assert len({attention.q_proj.weight.untyped_storage().data_ptr(), attention.v_proj.weight.untyped_storage().data_ptr()}) == 1
    model.train()
    assert lora_nodes(model(input_ids=ids, labels=ids).loss) == 4 * model.config.num_hidden_layers
    add_adapter(model, LoraConfig(rank=4, alpha=8, variant="dora", targets="all-linear"), "dora")
    set_active_adapters(model, "dora")
    model.train()
    assert lora_nodes(model(input_ids=ids, labels=ids).loss) == 0
    set_active_adapters(model, "a")
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, expected)


def test_a_fused_layer_with_adapters_keeps_what_the_estimate_counts():
    """A decoder layer's saved tensors (one layer's worth: 4 layers minus 2), bf16, LoRA with dropout on
    every linear layer: the norms' inputs, q, k, v, the attention's output, gate and up, as the memory
    estimate counts them. The norms' outputs and silu(gate) * up are rebuilt, not kept."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY
    from lora_app.lora import LoraConfig, add_adapter, group_shared_inputs
    from lora_app.training.fused import fuse

    def kept_bytes(layers: int) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": layers})).to(torch.bfloat16)
        fuse(model)
        add_adapter(model, LoraConfig(rank=4, alpha=8, dropout=0.1, targets="all-linear"), "a")
        group_shared_inputs(model)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()(input_ids=ids, labels=ids)
        return sum(kept.values())

    per_token = (kept_bytes(4) - kept_bytes(2)) / 2 / (4 * 64)
    hidden, inter, heads, kv_heads = TINY["hidden_size"], TINY["intermediate_size"], 4, 2
    # norms' inputs 2, q 1, k and v kv_heads / heads each, attention output 1; gate, up; bf16
    vectors = (4 + 2 * kv_heads / heads) * hidden + 2 * inter
    small = 2 * 4 + heads * 4 + 7 * 4 * 4  # fp32: two norm scales, a log-sum-exp a head, 7 adapters' rank-4 h
    # and per layer, not per token: the A's of q, k, v and of gate, up stacked (fp32, rank 4) for their nodes
    stacked = 5 * 4 * hidden * 4 / (4 * 64)
    assert per_token == vectors * 2 + small + stacked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_nodes_have_the_gradients_of_the_modules_they_replace(dtype):
    from lora_app.training.fused import RMSNormFunction, SiluMulFunction

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(16, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 16, dtype=dtype)
    xf = x.float()
    reference = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)  # transformers' norm
    fused, _ = RMSNormFunction.apply(x, w, 1e-5)
    assert torch.equal(fused, reference)
    for got, want in zip(torch.autograd.grad(fused, (x, w), g), torch.autograd.grad(reference, (x, w), g)):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    a, b = (torch.randn(3, 7, dtype=dtype, requires_grad=True) for _ in range(2))
    g = torch.randn(3, 7, dtype=dtype)
    reference = torch.nn.functional.silu(a) * b
    fused = SiluMulFunction.apply(a, b)
    assert torch.equal(fused, reference)
    for got, want in zip(torch.autograd.grad(fused, (a, b), g), torch.autograd.grad(reference, (a, b), g)):
        assert torch.equal(got, want)


# ---- batching ---------------------------------------------------------------------------------
def test_batches_cover_every_example_once_and_are_deterministic():
    lengths = [(i * 37) % 101 + 1 for i in range(230)]
    plan = plan_batches(lengths, 8, seed=1, epoch=0)
    assert sorted(i for batch in plan for i in batch) == list(range(230))
    assert plan == plan_batches(lengths, 8, seed=1, epoch=0)
    assert plan != plan_batches(lengths, 8, seed=1, epoch=1)
    assert padding_share(lengths, 8, "grouped", 512, seed=1) < padding_share(lengths, 8, "random", 512, seed=1) / 3
    shards = [plan_batches(lengths, 8, 1, 0, shard=(rank, 3)) for rank in range(3)]
    assert len({len(s) for s in shards}) == 1


def test_grouped_batches_of_a_small_dataset_are_redrawn_every_epoch():
    # a few dozen short rows: one mega-batch. A plain sort would give the same batches every epoch.
    lengths = [40 + (i * 7) % 30 for i in range(36)]
    epochs = [{frozenset(batch) for batch in plan_batches(lengths, 4, seed=0, epoch=e)} for e in range(3)]
    assert len(epochs[0] & epochs[1]) <= 2 and len(epochs[1] & epochs[2]) <= 2
    # ... and rows of similar length still share a batch
    assert padding_share(lengths, 4, "grouped", 256) < padding_share(lengths, 4, "random", 256) * 0.7
    assert padding_share(lengths, 4, "packed", 256) < padding_share(lengths, 4, "random", 256)


# ---- the loop ---------------------------------------------------------------------------------
def test_a_run_trains_logs_and_saves_an_adapter_that_peft_loads(tiny_llama, qa_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    callbacks, logged = quiet()
    outcome = train(config_for(tiny_llama, qa_data, tmp_path / "run", max_steps=12, val_fraction=0.25, eval_every=4),
                    callbacks)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert outcome.status == "completed" and summary["steps"] == 12
    for key in ("final_loss", "eval_loss", "train_tokens", "useful_tokens_per_second", "peak_memory_bytes",
                "trainable_params", "wall_seconds", "memory_estimate_bytes"):
        assert summary[key] and summary[key] > 0, key
    losses = [values["loss"] for _, values in logged if "loss" in values]
    assert losses[-1] < losses[0]
    assert any("eval_loss" in values for _, values in logged)
    assert {"lr", "grad_norm", "tokens_per_second", "eta", "rss_bytes"} <= set(logged[0][1])

    from lora_app.lora import load_adapter
    from lora_app.models import load_model

    ours, tokenizer = load_model(tiny_llama)
    load_adapter(ours, tmp_path / "run" / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "run" / "adapter")
    ids = tokenizer("What is the capital", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, peft_model(ids).logits, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits
    assert not torch.allclose(ours(ids).logits, base, atol=1e-3)  # training changed something


def test_an_existing_output_folder_is_never_overwritten(tiny_llama, qa_data, tmp_path):
    train(config_for(tiny_llama, qa_data, tmp_path / "run", max_steps=1), quiet()[0])
    before = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run"):
        train(config_for(tiny_llama, qa_data, tmp_path / "run", max_steps=1), quiet()[0])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_cancel_then_resume_gives_the_same_loss_curve(tiny_llama, qa_data, tmp_path):
    settings = dict(max_steps=6, dropout=0.1, grad_accum=2, batch_size=2, lora_plus_ratio=4.0)
    straight, straight_log = quiet()
    train(config_for(tiny_llama, qa_data, tmp_path / "straight", **settings), straight)

    steps_seen = []
    first, first_log = quiet(should_stop=lambda: len(steps_seen) >= 3)
    first.on_log = lambda step, values: (steps_seen.append(step), first_log.append((step, values)))
    assert train(config_for(tiny_llama, qa_data, tmp_path / "resumed", **settings), first).status == "cancelled"
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-4" / "optimizer.safetensors").exists()
    assert not (tmp_path / "resumed" / "adapter").exists()
    second, second_log = quiet()
    train(config_for(tiny_llama, qa_data, tmp_path / "resumed", resume=True, **settings), second)

    curve = {step: values["loss"] for step, values in straight_log if "loss" in values}
    resumed = {step: values["loss"] for step, values in first_log + second_log if "loss" in values}
    assert resumed.keys() == curve.keys()
    for step in curve:
        assert math.isclose(resumed[step], curve[step], rel_tol=1e-4), step


@pytest.mark.parametrize("variant", ["rslora", "dora", "lora-fa", "vera", "delta-lora"])
def test_every_variant_trains(variant, tiny_llama, qa_data, tmp_path):
    outcome = train(config_for(tiny_llama, qa_data, tmp_path / "run", variant=variant, max_steps=2), quiet()[0])
    assert outcome.summary["steps"] == 2 and math.isfinite(outcome.summary["final_loss"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_base_trains_on_cpu(quantization, tiny_llama, qa_data, tmp_path):
    outcome = train(config_for(tiny_llama, qa_data, tmp_path / "run", quantization=quantization, max_steps=2,
                               targets="all-linear"), quiet()[0])
    assert outcome.summary["steps"] == 2 and math.isfinite(outcome.summary["final_loss"])


def test_packing_and_gradient_checkpointing(tiny_llama, qa_data, tmp_path):
    outcome = train(config_for(tiny_llama, qa_data, tmp_path / "run", batching="packed", gradient_checkpointing=True,
                               max_steps=2), quiet()[0])
    assert outcome.summary["steps"] == 2 and math.isfinite(outcome.summary["final_loss"])


def test_a_diverging_run_stops_with_a_message(tmp_path, qa_data):
    model_dir = save_tiny("llama", tmp_path / "nan-model")
    model = tiny_model("llama")
    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    del model
    with pytest.raises(TrainingError, match="diverged"):
        train(config_for(str(model_dir), qa_data, tmp_path / "run"), quiet()[0])


def test_bad_data_is_found_before_the_model_loads(tiny_llama, tmp_path, monkeypatch):
    import lora_app.training.trainer as trainer

    empty = tmp_path / "empty.json"
    empty.write_text("")
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(TrainConfigError) as err:
        train(config_for(tiny_llama, str(empty), tmp_path / "run"), quiet()[0])
    assert "empty.json" in err.value.problems["data"] and not (tmp_path / "run").exists()


def test_out_of_memory_gives_advice():
    from lora_app.training.run import explain

    message = explain(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert "smaller batch" in message and "4-bit" in message and "gradient-checkpointing" in message


def test_memory_estimate_counts_the_real_trainable_parameters(tiny_llama, qa_data, tmp_path):
    from lora_app.hardware import choose_precision
    from lora_app.models import load_config
    from lora_app.training.memory import estimate_memory

    config = config_for(tiny_llama, qa_data, tmp_path / "run", max_steps=1)
    estimate = estimate_memory(config, load_config(tiny_llama), "cpu", choose_precision("auto", "cpu"))
    outcome = train(config, quiet()[0])
    assert estimate["trainable_params"] == outcome.summary["trainable_params"]
    assert estimate["total_bytes"] == sum(v for k, v in estimate.items() if k.endswith("_bytes") and k != "total_bytes")


def test_token_budget_changes_memory_not_the_update(tiny_llama, qa_data, tmp_path):
    from lora_app.training.batches import split_by_tokens

    chunks = split_by_tokens(list(range(6)), [10, 50, 20, 40, 30, 5], batch_size=4, budget=100)
    assert sorted(i for c in chunks for i in c) == list(range(6))
    assert all(len(c) * max([10, 50, 20, 40, 30, 5][i] for i in c) <= 100 for c in chunks)

    curves = []
    for budget in (0, 40):
        callbacks, logged = quiet()
        train(config_for(tiny_llama, qa_data, tmp_path / f"run{budget}", max_steps=3, max_batch_tokens=budget),
              callbacks)
        curves.append([values["loss"] for _, values in logged if "loss" in values])
    assert curves[0] == pytest.approx(curves[1], rel=same_update_rel())


def test_on_a_cpu_in_bf16_micro_batches_are_padded_to_few_widths(tiny_llama, qa_data, tmp_path, monkeypatch):
    """oneDNN keeps memory for every shape it meets in bf16; rounded widths keep the shapes few. The
    padding carries no label and no attention, so the update is the same as unpadded (fp32 here)."""
    from lora_app.hardware import Precision
    from lora_app.training import trainer
    from lora_app.training.batches import padded_width

    assert padded_width([5, 17], 16) == 32 and padded_width([32], 16) == 32 and padded_width([7], 1) == 7
    assert padded_width([250], 16, limit=250) == 250  # never past the sequence length...
    assert padded_width([300], 16, limit=250) == 300  # ...unless a row already is
    assert trainer.width_multiple("cpu", Precision("bf16", "")) == trainer.CPU_BF16_WIDTH_MULTIPLE
    assert trainer.width_multiple("cpu", Precision("fp32", "")) == trainer.width_multiple("cuda", Precision("bf16", "")) == 1

    widths, real_collate = [], trainer.collate
    monkeypatch.setattr(trainer, "collate", lambda rows, pad, width=None: widths.append(width) or real_collate(rows, pad, width))
    curves = []
    for multiple in (1, 16):
        monkeypatch.setattr(trainer, "width_multiple", lambda device, precision: multiple)
        callbacks, logged = quiet()
        train(config_for(tiny_llama, qa_data, tmp_path / f"run{multiple}", max_steps=3, precision="fp32",
                         eval_every=2), callbacks)
        curves.append([values["loss"] for _, values in logged if "loss" in values])
        if multiple == 16:
            assert widths and all(width % 16 == 0 for width in widths)
        widths.clear()
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)


def test_gradients_are_allocated_once_before_the_first_step(tiny_llama, qa_data, tmp_path, monkeypatch):
    from lora_app.training import trainer

    storages = []
    real_step = trainer.Recipe._loss_step

    def spy(self):
        storages.append({p.grad.data_ptr() for p in self.model.parameters() if p.requires_grad})
        return real_step(self)

    monkeypatch.setattr(trainer.Recipe, "_loss_step", spy)
    train(config_for(tiny_llama, qa_data, tmp_path / "run", max_steps=3), quiet()[0])
    # every step accumulates into the same tensors, zeroed in place (glibc's heap stays compact)
    assert len(storages) == 3 and len(storages[0]) > 0 and storages[0] == storages[1] == storages[2]


def test_columns_mapped_by_hand_reach_training(tiny_llama, tmp_path):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"question": q, "reply": a} for q, a in QA * 2]))
    with pytest.raises(Exception, match="reply"):  # no layout fits these columns by itself
        train(config_for(tiny_llama, str(data), tmp_path / "auto", max_steps=1), quiet()[0])
    outcome = train(config_for(tiny_llama, str(data), tmp_path / "mapped", max_steps=1, data_format="prompt_completion",
                               data_mapping={"prompt": "question", "completion": "reply"}), quiet()[0])
    assert outcome.summary["steps"] == 1


# ---- the command line -----------------------------------------------------------------------------
def test_cli_run_writes_its_log_and_ends_with_a_short_summary(tiny_llama, qa_data, tmp_path, capsys):
    from lora_app.training.cli import main

    base = ["train", "--model", tiny_llama, "--data", qa_data, "--rank", "4", "--max-steps", "2", "--seq-len", "96",
            "--no-store"]
    assert main([*base, "--output", str(tmp_path / "words")]) == 0
    out = capsys.readouterr().out
    assert "completed: 2 of 2 steps" in out and f"adapter: {tmp_path / 'words' / 'adapter'}" in out
    assert "step 2/2" in (tmp_path / "words" / "train.log").read_text()
    assert main([*base, "--output", str(tmp_path / "json"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["status"] == "completed"


def test_resume_continues_the_run_as_configured(tiny_llama, qa_data, tmp_path, capsys):
    from lora_app.training.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "--model", tiny_llama, "--data", qa_data, "--output", out, "--rank", "4", "--alpha", "8",
                 "--max-steps", "4", "--save-every", "2", "--seq-len", "96", "--no-store"]) == 0
    adapter = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    # a setting that would change what the run is: refused, naming each difference; nothing changes
    assert main(["train", "--output", out, "--resume", "--rank", "8", "--data", qa_data, "--no-store"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "rank was 4 when this run started, not 8" in err
    # the finished run: said so, and its adapter stays
    assert main(["train", "--output", out, "--resume", "--no-store"]) == 2
    assert "already finished its 4 steps" in capsys.readouterr().err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    # more steps: trained on with the run's own settings; the finished adapter is kept under its step
    assert main(["train", "--output", out, "--resume", "--max-steps", "6", "--no-store"]) == 0
    config = TrainConfig.from_file(tmp_path / "run" / "config.json")
    assert (config.rank, config.alpha, config.max_steps, config.resume) == (4, 8, 6, True)
    assert (tmp_path / "run" / "checkpoints" / "adapter-step4" / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


def test_cli_answers_mistakes_before_loading_torch_and_creates_no_run(qa_data, tmp_path):
    """A mistake that needs no model is found without importing torch (so the answer comes in a
    fraction of a second), is printed as `error: ...`, exits 2 and leaves nothing in the store."""
    import os
    import subprocess
    import sys

    from lora_app.training.store import RunStore

    taken = tmp_path / "taken"
    (taken / "adapter").mkdir(parents=True)
    code = ("import sys; from lora_app.training.cli import main; code = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    store = ["--store", str(tmp_path / "store")]
    mistakes = {"missing.json": ["--data", str(tmp_path / "missing.json")],
                "no-model": ["--data", qa_data, "--model", str(tmp_path / "no-model")],
                "not in the Hugging Face cache": ["--data", qa_data, "--model", "someone/not-downloaded"],
                "'nope'": ["--data", qa_data, "--data-format", "alpaca", "--data-mapping", "instruction=nope"],
                "already holds a run": ["--data", qa_data, "--output", str(taken)]}
    for expected, flags in mistakes.items():
        flags = flags if "--output" in flags else [*flags, "--output", str(tmp_path / "run")]
        out = subprocess.run([sys.executable, "-c", code, "train", *flags, *store], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error:") and expected in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()
    assert RunStore(tmp_path / "store").list() == []


def test_batching_is_a_setting_and_old_runs_with_packing_still_load():
    assert "batching" in TrainConfig(data="d", output="o", batching="sorted").problems()
    assert TrainConfig.from_dict({"data": "d", "output": "o", "packing": True}).batching == "packed"
    assert TrainConfig.from_dict({"data": "d", "output": "o", "packing": False}).batching == "grouped"


def test_the_system_prompt_choice_is_a_setting_and_travels_with_the_adapter(tiny_llama, qa_data, tmp_path):
    from lora_app.data import PromptFormat, SystemPrompt
    from lora_app.training.cli import build_config, parser

    args = vars(parser().parse_args(["--data", qa_data, "--output", str(tmp_path / "run"), "--system-prompt",
                                     "You are Quillon.", "--no-default-system-prompt"]))
    config = build_config(args)
    assert config.system() == SystemPrompt("You are Quillon.", use_default=False)
    train(config_for(tiny_llama, qa_data, tmp_path / "run", max_steps=1, system_prompt="You are Quillon."), quiet()[0])
    stored = PromptFormat.load(tmp_path / "run" / "adapter")
    assert stored.system == SystemPrompt("You are Quillon.") and stored.template == "tokenizer"
    assert "{% for" in stored.chat_template


def test_a_run_reports_its_phases_in_order(tiny_llama, qa_data, tmp_path):
    phases = []
    callbacks = Callbacks(log=lambda text: None, on_phase=lambda phase, detail: phases.append((phase, detail)))
    train(config_for(tiny_llama, qa_data, tmp_path / "run", max_steps=4, eval_every=2, val_fraction=0.25), callbacks)
    names = [name for i, (name, _) in enumerate(phases) if i == 0 or phases[i - 1][0] != name]
    assert names == ["preparing data", "loading model", "first step", "training", "evaluating", "training",
                     "evaluating", "saving"]
    assert phases[1][1].endswith("tokens") and "rows" in phases[1][1]  # what preparing the data found


def test_an_out_of_memory_step_is_computed_again_in_smaller_micro_batches(tiny_llama, qa_data, tmp_path, monkeypatch):
    """An out-of-memory error at step 3 (injected as the allocator raises it) halves the micro-batches;
    the steps keep their examples, so the loss curve is the uninterrupted run's and the run completes."""
    from lora_app.training import trainer

    plain_cb, plain = quiet()
    train(config_for(tiny_llama, qa_data, tmp_path / "plain", max_steps=5, cpu_lanes=1), plain_cb)
    events = []
    monkeypatch.setenv(trainer.FAULT_ENV, "3")
    cb, logged = quiet(on_event=lambda step, text: events.append((step, text)))
    # one lane: micro-batches of the whole batch of 4 (two lanes start at 2)
    outcome = train(config_for(tiny_llama, qa_data, tmp_path / "recovered", max_steps=5, cpu_lanes=1), cb)
    assert outcome.status == "completed" and outcome.summary["micro_batch"] == 2
    assert [step for step, _ in events] == [3] and "micro-batches of 4 examples cut to 2" in events[0][1]
    losses = [values["loss"] for _, values in logged if "loss" in values]
    assert losses == pytest.approx([values["loss"] for _, values in plain if "loss" in values], rel=same_update_rel())


def test_a_resumed_run_keeps_the_micro_batches_memory_allowed(tiny_llama, qa_data, tmp_path, monkeypatch):
    """Cut to 2 examples per micro-batch at step 2, cancelled after step 3: the resumed run goes on at
    2, rather than running out of memory again at the full 4."""
    from lora_app.training import trainer

    monkeypatch.setenv(trainer.FAULT_ENV, "2")
    steps = []
    first, _ = quiet(should_stop=lambda: len(steps) >= 3)
    first.on_log = lambda step, values: steps.append(step)
    settings = dict(max_steps=6, save_every=3, cpu_lanes=1)  # one lane: micro-batches of 4 to begin with
    assert train(config_for(tiny_llama, qa_data, tmp_path / "run", **settings), first).status == "cancelled"
    monkeypatch.delenv(trainer.FAULT_ENV)
    lines = []
    second = Callbacks(log=lines.append)
    outcome = train(config_for(tiny_llama, qa_data, tmp_path / "run", resume=True, **settings), second)
    assert outcome.status == "completed" and outcome.summary["micro_batch"] == 2
    assert any("micro-batches of 2 examples, as the run cut them" in line for line in lines)


def test_a_recovered_run_records_the_event_where_the_studio_shows_it(tiny_llama, qa_data, tmp_path, monkeypatch):
    from lora_app.training import trainer
    from lora_app.training.cli import main
    from lora_app.training.store import RunStore

    monkeypatch.setenv(trainer.FAULT_ENV, "2")
    assert main(["train", "--model", tiny_llama, "--data", qa_data, "--rank", "4", "--max-steps", "3", "--seq-len",
                 "96", "--output", str(tmp_path / "run"), "--store", str(tmp_path / "store")]) == 0
    run = RunStore(tmp_path / "store").list()[0]
    events = [m for m in RunStore(tmp_path / "store").metrics(run.id) if "event" in m]
    assert run.status == "completed" and [m["step"] for m in events] == [2]
    assert "step 2: out of memory" in (tmp_path / "run" / "train.log").read_text()
    from lora_app.ui.charts import loss_figure, memory_figure

    for figure in (loss_figure(RunStore(tmp_path / "store").metrics(run.id)), memory_figure(events)):
        assert any(a.text == "out of memory" for a in figure.layout.annotations)


def test_a_step_that_does_not_fit_even_one_example_at_a_time_fails_in_words(tiny_llama, qa_data, tmp_path,
                                                                             monkeypatch):
    from lora_app.errors import OutOfMemory
    from lora_app.training import trainer

    monkeypatch.setattr(trainer, "SAFE_MARGIN", 2**60)  # no micro-batch leaves that much memory free
    events = []
    with pytest.raises(OutOfMemory) as err:
        train(config_for(tiny_llama, qa_data, tmp_path / "out", cpu_lanes=1), quiet(on_event=lambda s, t: events.append(t))[0])
    assert err.value.step == 1 and "even with one example per micro-batch" in str(err.value)
    assert len(events) == 2  # 4 -> 2 -> 1 example per micro-batch, then it gave up


def test_lanes_give_the_update_of_one_micro_batch_at_a_time_and_repeat_bit_for_bit(tiny_llama, qa_data, tmp_path,
                                                                                    monkeypatch):
    """On a CPU, micro-batches trained side by side (training/lanes.py) add up to the same update as one
    at a time; with dropout, a run in lanes repeats exactly whichever lane finishes first."""
    from safetensors.torch import load_file

    from lora_app.training import lanes

    monkeypatch.setattr(lanes, "cores", lambda: 2)  # two lanes even on a one-core machine
    curves, adapters, said = {}, {}, {}
    for name, count, dropout in (("one", 1, 0.0), ("two", 2, 0.0), ("a", 2, 0.1), ("b", 2, 0.1)):
        logged, lines = [], []
        callbacks = Callbacks(on_log=lambda step, values: logged.append(values), log=lines.append)
        train(config_for(tiny_llama, qa_data, tmp_path / name, max_steps=3, precision="fp32", dropout=dropout,
                         cpu_lanes=count, max_batch_tokens=60), callbacks)
        curves[name] = [values["loss"] for values in logged if "loss" in values]
        adapters[name] = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        said[name] = [line for line in lines if line.startswith("lanes:")]
    assert said["one"] == [] and said["two"] == ["lanes: 2 micro-batches train at a time, on 1 core each"]
    assert curves["two"] == pytest.approx(curves["one"], rel=1e-5)
    for key, value in adapters["one"].items():
        torch.testing.assert_close(adapters["two"][key], value, rtol=1e-3, atol=1e-5)  # Adam divides by tiny moments
    assert curves["a"] == curves["b"] and curves["a"] != curves["two"]
    assert all(torch.equal(adapters["a"][key], adapters["b"][key]) for key in adapters["a"])

"""The inference engine on tiny random models: every mode, exact merge, hot-swap without reloads,
the LRU adapter cache, streaming and sampling, comparison, thread safety and every refusal."""

import threading
import time

import pytest
import torch

from test_inference_support import GREEDY, assets, base, engine  # noqa: F401  (fixtures)
from lora_app.inference import GenerationSettings, InferenceEngine, InferenceError, Mode, choose_device
from lora_app.inference.prompts import chat_messages, encode_prompt
from lora_app.lora import adapter_names, is_merged, lora_layers


def base_weights(model):
    """The base layers' weights by path (the tensors themselves, to check identity and values)."""
    return {path: layer.base_layer.weight for path, layer in lora_layers(model).items()}


def text(base, mode, prompt="hello", settings=GREEDY, **kwargs):
    return base.generate(prompt, settings=settings, mode=mode, **kwargs).text


# ------------------------------------------------------------------------------------------ modes
def test_every_mode_changes_the_output_and_base_mode_is_the_plain_model(base, assets):
    from transformers import AutoModelForCausalLM

    plain = text(base, None)
    a, b = base.load_adapter(assets["a"]), base.load_adapter(assets["b"])
    assert (a, b) == ("run-a", "run-b")  # a run's generic "adapter" folder is named after the run
    outputs = {
        "base": text(base, None), "a": text(base, a), "b": text(base, b),
        "mix": text(base, {a: 0.5, b: 0.5}), "merged": text(base, a, merged=True),
    }
    assert outputs["base"] == plain  # attaching adapters changes nothing until they are active
    assert len({outputs[k] for k in ("base", "a", "b", "mix")}) == 4
    assert outputs["merged"] == outputs["a"]
    assert text(base, {a: 1.0}) == outputs["a"]  # a mix of one at weight 1 is that adapter
    reference = AutoModelForCausalLM.from_pretrained(assets["base"])
    ids = encode_prompt(base.tokenizer, "hello")
    expected = reference.generate(**ids, max_new_tokens=10, do_sample=False, eos_token_id=base.eos_token_ids)
    assert base.tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == plain


def test_mode_kinds_and_labels():
    assert Mode.of(None).kind == "base" and Mode.of("a").kind == "adapter"
    assert Mode.of({"a": 0.7, "b": 0.3}).label == "mix(a=0.7, b=0.3)"
    assert Mode.of(["a", "b"]).adapters == {"a": 1.0, "b": 1.0}
    assert Mode.of("a", merged=True).label == "merged(a)" and Mode.merged_of({"a": 0.5}).kind == "merged"
    with pytest.raises(InferenceError, match="needs at least one adapter"):
        Mode.of(None, merged=True)
    with pytest.raises(InferenceError, match="number"):
        Mode.mix({"a": "lots"})


@pytest.mark.parametrize("adapter", ["a", "dora"])
def test_merged_and_unmerged_greedy_outputs_are_identical_and_unmerge_restores_the_base(base, assets, adapter):
    a, b = base.load_adapter(assets[adapter]), base.load_adapter(assets["b"])
    before = {k: v.detach().clone() for k, v in base_weights(base.model).items()}
    settings = GREEDY.with_(max_new_tokens=16)
    for mode in (Mode.of(a), Mode.of({a: 0.6, b: 0.4})):
        unmerged = base.generate("hello there", settings=settings, mode=mode)
        merged = base.generate("hello there", settings=settings, mode=mode, merged=True)
        assert is_merged(base.model) and base.mode.kind == "merged"
        assert merged.text == unmerged.text and merged.new_tokens == unmerged.new_tokens
    base.set_mode(None)  # leaving merged mode unmerges
    assert not is_merged(base.model) and not any(layer.active for layer in lora_layers(base.model).values())
    for path, weight in base_weights(base.model).items():
        torch.testing.assert_close(weight, before[path], rtol=0, atol=1e-6)


def test_adapters_trained_with_dropout_generate_deterministically(base, assets):
    name = base.load_adapter(assets["dora"])  # saved with lora_dropout 0.3
    assert not any(m.training for m in base.model.modules())  # dropout off while generating
    settings = GREEDY.with_(max_new_tokens=16)
    first = base.generate("hello", settings=settings, mode=name).text
    assert base.generate("hello", settings=settings, mode=name).text == first
    assert base.generate("hello", settings=settings, mode=name, merged=True).text == first


def test_switching_is_a_pointer_change_never_a_reload(base, assets):
    names = [base.load_adapter(assets[k]) for k in ("a", "b", "c")]
    model, weights = base.model, base_weights(base.model)
    snapshot = {k: v.detach().clone() for k, v in weights.items()}
    loads = {info.name: info.loads for info in base.adapters()}
    seconds = [base.set_mode(mode) for mode in (names[0], names[1], {names[0]: 0.3, names[2]: 0.7}, None,
                                                  names[2], names)]
    assert all(layer.active == {n: 1.0 for n in names} for layer in lora_layers(model).values())
    assert base.model is model and base_weights(model).keys() == weights.keys()
    for path, weight in base_weights(model).items():
        assert weight is weights[path] and torch.equal(weight, snapshot[path])  # not a bit changed
    assert {info.name: info.loads for info in base.adapters()} == loads  # nothing read from disk again
    assert base.load_adapter(assets["a"]) == names[0]  # the same folder again: the same adapter, no read
    assert base.load_adapter(assets["a"], name="other") == names[0]  # one copy per adapter
    assert base.adapters()[-1].loads == 1
    assert max(seconds) < 0.05


def test_a_rewritten_adapter_folder_is_reloaded_under_the_same_name(base, assets, tmp_path):
    import shutil

    from test_inference_support import make_adapter
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "mine"
    shutil.copytree(assets["a"], folder)
    name = base.load_adapter(folder)
    first = text(base, name)
    time.sleep(0.01)
    make_adapter(AutoModelForCausalLM.from_pretrained(assets["base"]), folder, seed=42)
    assert base.load_adapter(folder) == name
    assert text(base, name) != first and [i.name for i in base.adapters()] == [name]


# ------------------------------------------------------------------------------------------ cache
def test_lru_eviction_under_the_budget_and_transparent_reload(engine, assets):
    probe = engine.base(assets["base"])
    first = probe.load_adapter(assets["a"])
    size = probe.adapters()[0].nbytes
    assert size == sum(p.numel() * 4 for n, p in probe.model.named_parameters() if f".{first}." in n)
    fresh = engine.base(assets["base"])  # the same base, for reference outputs
    expected_b = text(fresh, fresh.load_adapter(assets["b"]))

    small = InferenceEngine(device="cpu", adapter_budget_bytes=2 * size, work_dir=engine.work_dir)
    base = small.base(assets["base"])
    a, b = base.load_adapter(assets["a"]), base.load_adapter(assets["b"])
    base.set_mode(a)  # a is now the most recently used (and active)
    c = base.load_adapter(assets["c"])  # over budget: b (least recently used) goes, not the active a
    loaded = {i.name: i.loaded for i in base.adapters()}
    assert loaded == {a: True, b: False, c: True} and set(adapter_names(base.model)) == {a, c}
    assert sum(i.nbytes for i in base.adapters() if i.loaded) <= 2 * size
    mix_ac = text(base, {a: 1.0, c: 1.0})
    assert text(base, b) == expected_b  # the evicted adapter reloads from its folder on use
    assert {i.name: i.loads for i in base.adapters()}[b] == 2
    with pytest.raises(InferenceError, match="memory budget"):
        base.set_mode([a, b, c])  # three do not fit at once
    assert base.mode == Mode.of(b) and text(base, {a: 1.0, c: 1.0}) == mix_ac


def test_base_models_are_kept_per_model_and_quantization_and_evicted_lru(tmp_path, assets):
    engine = InferenceEngine(device="cpu", max_bases=1, work_dir=tmp_path)
    first = engine.base(assets["base"])
    assert engine.base(str(assets["base"]) + "/") is first and engine.base(assets["base"], "none") is first
    other = engine.base(assets["wide_base"])
    assert engine.loaded() == [other.key] and engine.base(assets["base"]) is not first


@pytest.mark.parametrize("flags, chat, export", [
    ({"avx2", "fma"}, "bf16 weights, fp32 prompts", "fp32"),  # a token reads half the bytes
    ({"avx512f", "avx512_bf16"}, "bf16", "fp32"),
    ({"amx_bf16", "amx_tile"}, "bf16", "fp32"),
])
def test_the_engine_picks_its_precision_by_what_the_machine_computes(monkeypatch, tmp_path, flags, chat, export):
    from lora_app import hardware

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    asked = []

    def loader(name, quantization, *, dtype, device):
        asked.append(dtype)
        raise InferenceError("stop here")

    engine = InferenceEngine(device="cpu", work_dir=tmp_path, loader=loader)
    assert engine.key("any").precision.label == chat and engine.key("any", for_export=True).precision.label == export
    assert engine.key("any", "4bit").precision == hardware.choose_precision("auto", "cpu")  # bitsandbytes computes
    with pytest.raises(InferenceError):
        engine.base("any")
    with pytest.raises(InferenceError):
        InferenceEngine(device="cpu", dtype=torch.float32, work_dir=tmp_path, loader=loader).base("any")
    assert asked == [torch.bfloat16, torch.float32]  # what the caller asks for wins


def test_bf16_weights_compute_a_prompt_in_fp32_and_a_token_in_bf16():
    from conftest import tiny_model
    from lora_app.inference.decode import FP32_ROWS, Fp32PromptLinear, fp32_prompt_passes

    model = tiny_model("llama").to(torch.bfloat16).eval()
    fp32_prompt_passes(model)
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer) is Fp32PromptLinear and layer.weight.dtype == torch.bfloat16
    prompt = torch.randn(1, FP32_ROWS + 1, layer.in_features).bfloat16()
    expected = torch.nn.functional.linear(prompt.float(), layer.weight.float()).bfloat16()
    assert torch.equal(layer(prompt), expected)
    token = prompt[:, :1]
    assert torch.equal(layer(token), torch.nn.functional.linear(token, layer.weight))
    ids = torch.randint(3, 100, (1, 2 * FP32_ROWS))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# ------------------------------------------------------------------------------------- generation
def test_streaming_pieces_add_up_and_report_tokens_per_second(base):
    stream = base.stream("hello", settings=GREEDY.with_(max_new_tokens=8))
    assert base.busy is False  # nothing is held until iteration starts
    pieces = list(stream)
    result = stream.result
    assert "".join(pieces).strip() == result.text and result.new_tokens == 8 and result.finish_reason == "length"
    assert result.tokens_per_s > 0 and result.seconds > 0 and result.prompt_tokens > 0 and not base.busy


def test_sampling_is_seeded_and_greedy_ignores_the_seed(base):
    hot = GenerationSettings(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=40, repetition_penalty=1.2)
    same = [text(base, None, settings=hot.with_(seed=1)) for _ in range(2)]
    assert same[0] == same[1]
    assert len({text(base, None, settings=hot.with_(seed=s)) for s in range(2, 6)}) > 1
    assert text(base, None, settings=GREEDY.with_(seed=1)) == text(base, None, settings=GREEDY.with_(seed=2))
    plain = GenerationSettings(max_new_tokens=12, temperature=1.0, seed=7)  # top-p and top-k off
    assert text(base, None, settings=plain) == text(base, None, settings=plain)


@pytest.mark.parametrize("settings", [
    GREEDY.with_(max_new_tokens=12),
    GenerationSettings(max_new_tokens=12, temperature=1.3, top_p=0.9, top_k=20, repetition_penalty=1.2, seed=3),
    GenerationSettings(max_new_tokens=12, min_new_tokens=12, temperature=1.0, seed=5),
], ids=["greedy", "sampled", "min-length"])
def test_the_token_loop_picks_what_transformers_generate_picks(base, assets, settings):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(assets["base"])
    ids = encode_prompt(base.tokenizer, "hello")
    torch.manual_seed(settings.seed)
    config = settings.generation_config(base.eos_token_ids, base.tokenizer.pad_token_id)
    expected = reference.generate(**ids, generation_config=config)[0, ids["input_ids"].shape[1]:]
    result = base.generate("hello", settings=settings)
    assert result.text == base.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert result.new_tokens == len(expected)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "llama"])
def test_the_token_loop_follows_generate_on_each_architecture(kind):
    from conftest import tiny_model
    from lora_app.inference.decode import TokenLoop

    model = tiny_model(kind).eval()
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    expected = model.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              eos_token_id=[0], pad_token_id=0)[0, 7:].tolist()
    loop = TokenLoop(model, GREEDY.with_(max_new_tokens=12, min_new_tokens=12), [0], threading.Event())
    assert list(loop.run(ids)) == expected and loop.seconds > 0


def test_stops_at_eos(base):
    eos = base.tokenizer.eos_token_id
    calls = []

    def force_eos_after_three(module, args, output):
        calls.append(1)
        if len(calls) > 3:
            output.logits[..., eos] = 1e4
        return output

    handle = base.model.register_forward_hook(force_eos_after_three)
    try:
        result = base.generate("hello", settings=GREEDY.with_(max_new_tokens=50))
    finally:
        handle.remove()
    assert result.finish_reason == "eos" and result.new_tokens == 4


def test_chat_template_history_system_and_raw(base):
    tok = base.tokenizer
    ids = encode_prompt(tok, "hi")["input_ids"][0].tolist()
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # no system prompt
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]
    assert chat_messages("three", history, system="be brief") == [
        {"role": "system", "content": "be brief"}, *history, {"role": "user", "content": "three"}]
    assert chat_messages("three", [("one", "two")]) == [*history, {"role": "user", "content": "three"}]
    assert tok.decode(encode_prompt(tok, "Once", raw=True)["input_ids"][0]) == "Once"
    raw = base.generate("Once", raw=True, settings=GREEDY)
    chat = base.generate("Once", settings=GREEDY)
    assert raw.prompt_tokens == 4 and chat.prompt_tokens > 4 and raw.text != chat.text
    with_history = base.generate("three", history=history, system="be brief", settings=GREEDY)
    assert with_history.prompt_tokens == len(encode_prompt(tok, "three", history=history, system="be brief")
                                             ["input_ids"][0])


def test_wrappers_with_nothing_to_add_step_aside_while_generating(base, assets):
    """Merged, or the base: while a reply is generated the model holds no LoRA wrapper at all (it runs
    as one that never had adapters); unmerged, they stay. Every wrapper is back once the reply ends,
    however it ends."""
    a = base.load_adapter(assets["a"])
    wrappers = lora_layers(base.model)
    for mode, kept in ((Mode.of(a, merged=True), set()), (Mode.base(), set()), (Mode.of(a), set(wrappers))):
        stream = base.stream("hello", settings=GREEDY.with_(max_new_tokens=50), mode=mode)
        next(iter(stream))
        assert set(lora_layers(base.model)) == kept, mode.label
        stream.close()
        assert lora_layers(base.model) == wrappers  # the same wrapper objects, in the same places
    expected = text(base, a, merged=True)
    assert [c.generation.text for c in base.iter_compare("hello", [a], merged=True, settings=GREEDY)][1] == expected
    assert lora_layers(base.model) == wrappers


def test_closing_a_stream_frees_the_model(base):
    stream = base.stream("hello", settings=GREEDY.with_(max_new_tokens=100))
    next(iter(stream))
    assert base.busy
    stream.close()
    assert not base.busy and text(base, None)


def test_concurrent_sessions_each_get_their_own_mode(base, assets):
    a, b = base.load_adapter(assets["a"]), base.load_adapter(assets["b"])
    expected = {m: text(base, m) for m in (a, b, None)}
    results, errors = {}, []

    def session(mode, i):
        try:
            results[(mode, i)] = text(base, mode)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=session, args=(m, i)) for i in range(2) for m in (a, b, None)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results[(m, i)] == expected[m] for (m, i) in results) and len(results) == 6


# ---------------------------------------------------------------------------------------- compare
def test_compare_base_adapters_and_mix_with_one_seed(base, assets):
    a, b = base.load_adapter(assets["a"]), base.load_adapter(assets["b"])
    base.set_mode(b)
    settings = GenerationSettings(max_new_tokens=10, temperature=0.9, seed=5)
    columns = list(base.iter_compare("hello", [a, b], mix={a: 0.5, b: 0.5}, settings=settings))
    assert [c.label for c in columns] == ["base", a, b, f"mix({a}=0.5, {b}=0.5)"]
    assert all(c.tokens_per_s > 0 and c.generation.new_tokens > 0 for c in columns)
    for column in columns:  # each column is what that mode alone gives with the same seed
        assert column.text == text(base, column.mode, settings=settings)
    assert len({c.text for c in base.iter_compare("hello", [a, b], mix={a: 0.5, b: 0.5}, settings=GREEDY)}) == 4
    base.set_mode(b)
    merged = list(base.iter_compare("hello", [a], include_base=False, merged=True, settings=settings))
    assert merged[0].label == f"merged({a})" and merged[0].text == columns[1].text
    assert base.mode == Mode.of(b) and not is_merged(base.model)  # the previous mode is back


# ---------------------------------------------------------------------------------------- refusals
def test_empty_prompt_is_refused(base):
    for prompt in ("", "   \n", None):
        with pytest.raises(InferenceError, match="empty"):
            base.stream(prompt)
    with pytest.raises(InferenceError, match="empty"):
        base.stream(" ", raw=True)
    with pytest.raises(InferenceError, match="empty"):
        base.iter_compare("", [])  # refused when asked, not when the first column is due
    with pytest.raises(InferenceError, match="nothing to compare"):
        base.iter_compare("hi", [], include_base=False)


@pytest.mark.parametrize("other", ["gpt2", "wide"])
def test_adapter_for_another_base_names_the_mismatch_and_the_base_stays_usable(base, assets, other):
    a = base.load_adapter(assets["a"])
    before = (text(base, None), text(base, a))
    with pytest.raises(InferenceError) as err:
        base.load_adapter(assets[other])
    message = str(err.value)
    assert "another base model" in message and str(assets["base"]) in message
    assert ("transformer.h.0" in message) if other == "gpt2" else ("shape" in message)
    assert adapter_names(base.model) == [a] and (text(base, None), text(base, a)) == before


def test_corrupt_adapter_file_is_an_error_and_nothing_else_is_unloaded(base, assets, tmp_path):
    import shutil

    a, b = base.load_adapter(assets["a"]), base.load_adapter(assets["b"])
    base.set_mode({a: 0.5, b: 0.5}, merged=True)
    before = text(base, base.mode)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(assets["c"], corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(InferenceError, match="not a readable safetensors file"):
        base.load_adapter(corrupt)
    (corrupt / "adapter_model.safetensors").unlink()
    (corrupt / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InferenceError, match="pickle"):
        base.load_adapter(corrupt)
    assert [i.name for i in base.adapters()] == [a, b] and all(i.loaded for i in base.adapters())
    assert base.mode.kind == "merged" and is_merged(base.model) and text(base, base.mode) == before


def test_unknown_adapters_bad_settings_and_missing_folders(base, assets, tmp_path):
    with pytest.raises(InferenceError, match="no adapter named 'nope'"):
        base.set_mode("nope")
    with pytest.raises(InferenceError, match="no adapter named"):
        list(base.stream("hi", mode="nope"))
    assert not base.busy and base.mode == Mode.base()
    with pytest.raises(InferenceError) as err:
        GenerationSettings(max_new_tokens=0, temperature=-1, top_p=0, top_k=-1, repetition_penalty=0, seed=-3)
    for part in ("max new tokens", "temperature", "top-p", "top-k", "repetition penalty", "seed"):
        assert part in str(err.value)
    with pytest.raises(InferenceError, match="does not exist"):
        base.load_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InferenceError, match="holds no adapter"):
        base.load_adapter(tmp_path / "empty")
    with pytest.raises(InferenceError, match="several adapters"):
        base.load_adapter(assets["a"].parent.parent)  # runs/ holds run-a, run-b, run-c
    name = base.load_adapter(assets["a"].parent)  # a run folder holding one adapter is fine
    with pytest.raises(InferenceError, match="already loaded"):
        base.load_adapter(assets["b"], name=name)


def test_a_training_run_folder_means_its_final_adapter(base, assets, tmp_path):
    import shutil

    run = tmp_path / "my.run"  # the training engine's layout: adapter/ and checkpoints/checkpoint-N/adapter/
    shutil.copytree(assets["a"], run / "adapter")
    shutil.copytree(assets["b"], run / "checkpoints" / "checkpoint-5" / "adapter")
    name = base.load_adapter(run)
    assert name == "my_run" and base.adapters()[0].folder == run / "adapter"


def test_merged_mode_is_refused_on_a_quantized_base_and_the_mode_stays(engine, assets):
    base = engine.base(assets["base"], "4bit")
    a = base.load_adapter(assets["a"])
    base.set_mode(a)
    with pytest.raises(InferenceError, match="not available on a 4bit base"):
        base.set_mode(a, merged=True)
    assert base.mode == Mode.of(a) and not is_merged(base.model)
    assert base.generate("hi", settings=GREEDY.with_(max_new_tokens=3)).new_tokens == 3


def test_device_choice_serves_on_cpu_while_training_holds_the_gpu(monkeypatch):
    assert choose_device("cpu").device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    busy = choose_device("auto", gpu_busy=True)
    assert busy.device == "cpu" and "training" in busy.note
    assert choose_device("auto").device == "cuda:0"  # named as the run store names it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(None).device == "cpu"
    with pytest.raises(InferenceError, match="no CUDA GPU"):
        choose_device("cuda")
    with pytest.raises(InferenceError, match="unknown device"):
        choose_device("tpu")


def test_the_token_loops_processors_sit_on_the_scores_device():
    """A GPU's scores met the end-of-sequence ids on the CPU in MinNewTokens' ``isin`` and the reply
    stopped with an error (H200); the processors are now built on the prompt's device."""
    from lora_app.inference import GenerationSettings
    from lora_app.inference.decode import logits_processors

    settings = GenerationSettings(max_new_tokens=8, min_new_tokens=4, repetition_penalty=1.1)
    processors = logits_processors(settings, prompt_len=5, eos_ids=[2, 3], device=torch.device("meta"))
    eos = [p.eos_token_id for p in processors if hasattr(p, "eos_token_id")]
    assert eos and all(t.device.type == "meta" for t in eos)

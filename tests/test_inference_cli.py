"""`python -m lora_app generate` / `export`: only the completion on stdout, every mode, and one clear
line on stderr with exit code 2 for each kind of bad input."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from test_inference_support import GREEDY, assets  # noqa: F401  (fixture)
from lora_app.inference import GenerationSettings, InferenceEngine
from lora_app.inference.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def generate(capsys, assets, *extra):
    return run(capsys, "generate", "--model", str(assets["base"]), "--max-new-tokens", "10", *extra)


def expected(assets, prompt="hello", adapters=(), mode=None, dtype=None, **kwargs):
    base = InferenceEngine(device="cpu", dtype=dtype).base(assets["base"])
    names = [base.load_adapter(assets[a]) for a in adapters]
    if mode is None:
        mode = names
    elif callable(mode):
        mode = mode(names)
    return base.generate(prompt, settings=kwargs.pop("settings", GREEDY), mode=mode, **kwargs).text


def test_generate_prints_only_the_completion(capsys, assets, app_home):
    code, out, err = generate(capsys, assets, "--prompt", "hello")
    assert code == 0 and out == expected(assets) + "\n"
    assert "tokens/s" in err  # the figures go to stderr
    code, out, _ = generate(capsys, assets, "--adapter", str(assets["a"]), "--prompt", "hello")
    assert code == 0 and out == expected(assets, adapters=["a"]) + "\n" and out != expected(assets) + "\n"


def test_generate_modes_raw_system_and_sampling(capsys, assets, app_home):
    a, b = str(assets["a"]), str(assets["b"])
    _, mix, _ = generate(capsys, assets, "--adapter", a, b, "--weights", "0.7", "0.3", "--prompt", "hello")
    assert mix == expected(assets, adapters=["a", "b"], mode=lambda n: {n[0]: 0.7, n[1]: 0.3}) + "\n"
    merged_and_not = [generate(capsys, assets, "--adapter", a, "--adapter", b, "--weights", "0.7", "0.3", *merge,
                               "--prompt", "hello", "--precision", "fp32")[1] for merge in ([], ["--merge"])]
    assert merged_and_not[0] == merged_and_not[1]  # exact in fp32; bf16 weights would round the merged ones
    _, raw, _ = generate(capsys, assets, "--raw", "--prompt", "Once")
    assert raw == expected(assets, "Once", raw=True) + "\n"
    _, system, _ = generate(capsys, assets, "--system", "be brief", "--prompt", "hello")
    assert system == expected(assets, system="be brief") + "\n"
    sampled = GenerationSettings(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.1,
                                 seed=3)
    _, out, _ = generate(capsys, assets, "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20",
                         "--repetition-penalty", "1.1", "--seed", "3", "--prompt", "hello")
    assert out == expected(assets, settings=sampled) + "\n"


@pytest.mark.parametrize("case, argv, message", [
    ("empty prompt", ["--prompt", "  "], "prompt is empty"),
    ("missing adapter", ["--adapter", "/no/such/adapter", "--prompt", "hi"], "does not exist"),
    ("another base", ["--adapter", "{gpt2}", "--prompt", "hi"], "another base model"),
    ("corrupt", ["--adapter", "{corrupt}", "--prompt", "hi"], "not a readable safetensors"),
    ("weights count", ["--adapter", "{a}", "--weights", "0.5", "0.5", "--prompt", "hi"], "1 adapter"),
    ("merge alone", ["--merge", "--prompt", "hi"], "--merge needs"),
    ("bad setting", ["--temperature", "-1", "--prompt", "hi"], "temperature must be >= 0"),
    ("not a zip", ["--adapter", "{fake_zip}", "--prompt", "hi"], "not a readable zip"),
])
def test_generate_errors_are_one_line_and_exit_2(capsys, assets, app_home, tmp_path, case, argv, message):
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(assets["a"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"garbage")
    fake_zip = tmp_path / "fake.zip"
    fake_zip.write_bytes(b"PK\x03\x04 broken")
    paths = {"gpt2": assets["gpt2"], "corrupt": corrupt, "a": assets["a"], "fake_zip": fake_zip}
    argv = [a.format(**paths) for a in argv]
    code, out, err = generate(capsys, assets, *argv)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and out == "" and len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_streamed_output_is_trimmed_like_the_final_text():
    import io

    from lora_app.inference.cli import _Trimmed

    out = io.StringIO()
    writer = _Trimmed(out)
    for piece in [" ", "\n", "Hello", " ", " world", "\n\n"]:
        writer.write(piece)
    assert out.getvalue() == "Hello  world"


def test_prompt_from_stdin(capsys, assets, app_home, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello"))
    code, out, _ = generate(capsys, assets, "--prompt", "-")
    assert code == 0 and out == expected(assets) + "\n"


def test_usage_errors(capsys):
    assert run(capsys, "generate")[0] == 2  # --prompt is required: argparse's usage message
    assert run(capsys, "nothing")[0] == 2
    assert run(capsys, "generate", "--help")[0] == 0


def test_export_merged_and_zip(capsys, assets, app_home, tmp_path):
    from transformers import AutoModelForCausalLM

    merged, archive = tmp_path / "merged", tmp_path / "a.zip"
    code, out, err = run(capsys, "export", "--model", str(assets["base"]), "--adapter", str(assets["a"]),
                         "--merged-out", str(merged), "--zip-out", str(archive))
    assert code == 0 and out.split() == [str(archive), str(merged)], err
    assert AutoModelForCausalLM.from_pretrained(merged) is not None
    assert sorted(zipfile.ZipFile(archive).namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    code, out, _ = generate(capsys, {"base": merged}, "--prompt", "hello", "--precision", "fp32")
    assert out == expected(assets, adapters=["a"], dtype=torch.float32) + "\n"
    code, _, err = run(capsys, "export", "--adapter", str(assets["a"]), "--zip-out", str(archive))
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "export", "--adapter", str(assets["a"]))
    assert code == 2 and "nothing to export" in err
    code, _, err = run(capsys, "export", "--adapter", str(assets["a"]), str(assets["b"]), "--zip-out", "x.zip")
    assert code == 2 and "exactly one --adapter" in err


def test_export_gguf_with_its_modelfile_and_template_check(capsys, assets, app_home, tmp_path):
    target = tmp_path / "out" / "a-f16.gguf"
    code, out, err = run(capsys, "export", "--model", str(assets["base"]), "--adapter", str(assets["a"]),
                         "--gguf-out", str(target), "--gguf-type", "f16")
    assert code == 0 and out.split() == [str(target), str(target.with_suffix(".Modelfile"))], err
    assert "GGUF chat template: identical" in err and "Ollama Modelfile: identical" in err
    assert "ollama create a-f16 -f a-f16.Modelfile" in err
    code, _, err = run(capsys, "export", "--adapter", str(assets["a"]), "--gguf-out", str(target))
    assert code == 2 and "already exists" in err
    alone = tmp_path / "out" / "a-lora.gguf"  # the adapter alone, for llama.cpp's --lora
    code, out, err = run(capsys, "export", "--model", str(assets["base"]), "--adapter", str(assets["a"]),
                         "--gguf-adapter-out", str(alone))
    assert code == 0 and out.split() == [str(alone)], err


def test_export_push_offline_is_a_clear_error(capsys, assets, app_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run(capsys, "export", "--adapter", str(assets["a"]), "--zip-out", str(tmp_path / "a.zip"),
                         "--push-to-hub", "me/adapter")
    assert code == 2 and "offline" in err and "Traceback" not in err


def test_python_m_lora_app_generate_stdout_is_only_the_completion(assets, app_home, tmp_path):
    archive = tmp_path / "a.zip"
    from lora_app.inference import zip_adapter

    zip_adapter(assets["a"], archive)
    env = {**os.environ, "LORA_APP_HOME": app_home, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lora_app", "generate", "--model", str(assets["base"]), "--adapter",
                           str(archive), "--prompt", "hello", "--max-new-tokens", "10"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected(assets, adapters=["a"]) + "\n"  # progress bars and figures: stderr only
    assert "tokens/s" in done.stderr

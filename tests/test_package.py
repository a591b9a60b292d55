"""The package as a user gets it: `python -m lora_app` / `lora-app` from any folder; a pip install of
pyproject.toml (the `lora-app` command, the pins of requirements.txt, the page's CSS); bitsandbytes,
whose import may warn about optional CPU kernels, imported only for a quantized model, and that
warning left out then."""

import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import save_tiny
from lora_app.models import load_model

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["train", "sweep", "plan", "probes", "promote", "generate", "export", "studio"]
UNKNOWN = f"error: unknown command 'x' (choose from {', '.join(COMMANDS)})\n"


def run_python(args, cwd, pythonpath, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1", "LORA_APP_HOME": str(Path(cwd) / "home")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_lists_commands(out):
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines() if line.startswith("  ")}
    assert list(listed) == COMMANDS
    assert all(about.strip() for about in listed.values())


def test_help_and_no_command_list_the_commands_from_any_folder(tmp_path):
    assert_lists_commands(run_python(["-m", "lora_app", "--help"], tmp_path, ROOT))
    assert_lists_commands(run_python(["-m", "lora_app"], tmp_path, ROOT))


def test_an_unknown_command_is_named_on_stderr_with_exit_2(tmp_path):
    out = run_python(["-m", "lora_app", "x"], tmp_path, ROOT)
    assert (out.returncode, out.stdout, out.stderr) == (2, "", UNKNOWN)


def test_studio_help_says_how_to_serve_without_serving(tmp_path):
    out = run_python(["-m", "lora_app", "studio", "--help"], tmp_path, ROOT)
    assert out.returncode == 0, out.stderr
    assert "--port" in out.stdout and "--host" in out.stdout


def test_pip_install_gives_the_lora_app_command_the_pins_and_the_css(tmp_path):
    # build from a copy, so the build leaves nothing in the repository (build/, *.egg-info)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lora_app", src / "lora_app", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=120)

    dist = next(importlib.metadata.distributions(path=[str(site)]))
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"lora-app": "lora_app.__main__:main"}
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert dist.requires == pins
    assert (site / "lora_app" / "ui" / "style.css").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run_python(["-c", "import lora_app; print(lora_app.__file__)"], elsewhere, site)
    assert Path(where.stdout.strip()).is_relative_to(site)
    assert_lists_commands(run_python(["-m", "lora_app", "--help"], elsewhere, site))
    assert_lists_commands(run_python([str(site / "bin" / "lora-app")], elsewhere, site))
    assert run_python([str(site / "bin" / "lora-app"), "x"], elsewhere, site).stderr == UNKNOWN


def test_a_default_run_never_imports_bitsandbytes(tmp_path):
    save_tiny("llama", tmp_path / "tiny")
    train = ["train", "--data", str(ROOT / "assets" / "demo_captain_byte.jsonl"), "--model", str(tmp_path / "tiny"),
             "--max-steps", "1", "--seq-len", "32", "--no-store", "--output", str(tmp_path / "run")]
    code = ("import sys, lora_app.models, lora_app.training.trainer, lora_app.inference, lora_app.studio\n"
            "from lora_app.__main__ import main\n"
            "imported = sorted(m for m in sys.modules if m.split('.')[0] == 'bitsandbytes')\n"
            f"assert main({train!r}) == 0\n"
            "print(imported, sorted(m for m in sys.modules if m.split('.')[0] == 'bitsandbytes'))")
    out = run_python(["-c", code], tmp_path, ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "[] []"
    assert "bitsandbytes" not in out.stderr and "gemm_4bit" not in out.stderr


def test_a_quantized_load_drops_only_the_cpu_kernels_warning(tmp_path, caplog):
    load_model(save_tiny("llama", tmp_path / "tiny"), "4bit", device="cpu")
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")  # as bitsandbytes logs it, on AVX512-BF16 CPUs
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                   "`pip install kernels` and the kernels >= 0.11.1", ModuleNotFoundError("No module named 'kernels'"))
    logger.warning("something else")
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == ["something else"]

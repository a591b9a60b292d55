"""The README's headless block runs as written on a fresh clone (with fewer steps), and `.ci/run` runs
exactly the README's test command."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FEWER = {"--max-steps 60": "--max-steps 2", "--max-steps 90": "--max-steps 3", "--save-every 20": "--save-every 1",
         "--seq-len 256": "--seq-len 64"}


def headless_commands() -> list[str]:
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README, re.S) if "python -m lora_app train" in b)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_headless_block_runs_as_written(tmp_path):
    (tmp_path / "assets").symlink_to(ROOT / "assets")  # a fresh clone's folder, without the repository's files
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "LORA_APP_RUNS": str(tmp_path / "store")}
    commands = headless_commands()
    assert [c.split()[3] for c in commands] == ["train", "train", "generate", "generate", "export",
                                                   "export"]
    for command in commands:
        for long, short in FEWER.items():
            command = command.replace(long, short)
        out = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        if " generate " in command:
            assert out.stdout.strip(), command
    assert (tmp_path / "runs" / "captain" / "checkpoints" / "adapter-step2").is_dir()  # the finished adapter, kept
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "captain.zip").exists()
    assert (tmp_path / "export" / "captain-q8_0.gguf").exists() and (tmp_path / "export" / "captain-q8_0.Modelfile").exists()


def test_ci_runs_exactly_the_readme_test_command():
    command = next(line for line in README.splitlines() if line.startswith("pip install -r requirements-test.txt"))
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()

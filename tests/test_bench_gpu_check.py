"""bench/gpu_check.py runs end to end on a CPU (its tiny shape), so it works the first time it meets a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_a_cpu_and_passes_its_checks(tmp_path):
    rows = [{"instruction": f"Name a colour number {i}.", "input": "", "output": f"Colour {i} is blue, mostly."}
            for i in range(12)]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--shapes", "tiny", "--modes", "lora",
                          "--steps", "2", "--warmup", "1", "--data", str(data), "--out-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    figures = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    recipes = {r["recipe"]: r for r in figures["training"]}
    assert set(recipes) == {"Trainer+peft", "studio"}
    for result in recipes.values():
        assert result["tokens_per_s"] > 0 and result["peak_bytes"] > 0 and len(result["step_seconds"]) == 2
    assert recipes["studio"]["estimate_bytes"] > 0
    assert figures["generation"]["merged_equals_unmerged_float32"]
    assert figures["worker"]["status"] == "completed" and figures["worker"]["device"] == "cpu"
    assert figures["worker"]["match"]  # the memory chart shows the run's measured peak (within 1 %)
    assert "merged vs unmerged greedy text, float32: identical" in out.stdout

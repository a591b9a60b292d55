"""The planner's predictions against the runs they predict, on this machine.

For each setting: `python -m lora_app plan` (a fresh process, a few of the run's longest steps), then the
run itself (`python -m lora_app train`, a fresh process); printed side by side: predicted and measured
peak memory (RSS on a CPU, the CUDA allocator's peak on a GPU) and training time (the run's own
wall_seconds: its steps and evaluations), with the error of each prediction.

    python bench/bench_plan.py                      # default model, the demo data, three settings
    python bench/bench_plan.py --steps 20 --data ../shared/data/alpaca_en_demo.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "LoRA r16, seq 256": ["--rank", "16", "--alpha", "32", "--seq-len", "256"],
    "QLoRA 4-bit r16, seq 256": ["--rank", "16", "--alpha", "32", "--seq-len", "256", "--quantization", "4bit"],
    "LoRA r16, packed to 1024": ["--rank", "16", "--alpha", "32", "--seq-len", "1024", "--batching", "packed",
                                 "--batch-size", "1"],
}


def lora_app(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "lora_app", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"lora_app {args[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "assets" / "demo_captain_byte.jsonl"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--model", default="default")
    args = p.parse_args()
    common = ["--model", args.model, "--data", args.data, "--max-steps", str(args.steps), "--val-fraction", "0.05",
              "--eval-every", "10", "--no-store"]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, flags in SETTINGS.items():
            plan_file = Path(scratch) / f"{len(rows)}-plan.json"
            lora_app("plan", *common, *flags, "--out", str(plan_file))
            plan = json.loads(plan_file.read_text())
            out = Path(scratch) / f"{len(rows)}-run"
            summary = json.loads(lora_app("train", *common, *flags, "--output", str(out), "--json").splitlines()[-1])
            rows.append((name, plan, summary))
            print(f"done: {name}", file=sys.stderr, flush=True)
    print(f"{'setting':<30} {'peak: plan':>11} {'run':>9} {'error':>7}   {'time: plan':>11} {'run':>8} {'error':>7}"
          f"   {'formula':>9}")
    for name, plan, s in rows:
        peak, seconds = s["peak_memory_bytes"], s["wall_seconds"]
        print(f"{name:<30} {plan['peak_bytes'] / 2**30:>9.2f}Gi {peak / 2**30:>7.2f}Gi "
              f"{100 * (plan['peak_bytes'] / peak - 1):>+6.1f}%   {plan['train_seconds']:>10.0f}s {seconds:>7.0f}s "
              f"{100 * (plan['train_seconds'] / seconds - 1):>+6.1f}%   {plan['formula_bytes'] / 2**30:>7.2f}Gi")


if __name__ == "__main__":
    main()

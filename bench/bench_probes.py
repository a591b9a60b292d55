"""What probe answers cost a run: the same run without probes, with probes at every evaluation (no
budget), and with the default probe time budget, each in a fresh process, side by side.

    python bench/bench_probes.py                    # default model, the demo data, 60 steps, eval every 20
    python bench/bench_probes.py --steps 30 --eval-every 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Who are you?", "Where is the treasure?", "What is 2 + 2?"]


def train(flags: list[str], output: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "lora_app", "train", *flags, "--output", str(output), "--json",
                           "--no-store"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"train failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.splitlines()[-1])
    rounds = sorted({json.loads(line)["step"] for line in (output / "probes.jsonl").read_text().splitlines()}) \
        if (output / "probes.jsonl").exists() else []
    return {**summary, "rounds": rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "assets" / "demo_captain_byte.jsonl"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=20)
    args = p.parse_args()
    common = ["--data", args.data, "--rank", "16", "--alpha", "32", "--lr", "1e-3", "--max-steps", str(args.steps),
              "--seq-len", "256", "--val-fraction", "0.05", "--eval-every", str(args.eval_every), "--warmup", "0.05"]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        prompts = Path(scratch) / "probes.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        probes = ["--probe-prompts", str(prompts), "--probe-rows", "2"]
        for name, flags in (("no probes", []), ("5 probes, no budget", [*probes, "--probe-budget", "0"]),
                            ("5 probes, default budget", probes)):
            rows.append((name, train([*common, *flags], Path(scratch) / str(len(rows)))))
            print(f"done: {name}", file=sys.stderr, flush=True)
    plain = rows[0][1]["wall_seconds"]
    print(f"{'run':<26} {'wall':>7} {'vs none':>8} {'probing':>8} {'share':>6}  probed at steps")
    for name, s in rows:
        print(f"{name:<26} {s['wall_seconds']:>6.0f}s {100 * (s['wall_seconds'] / plain - 1):>+7.1f}% "
              f"{s['probe_seconds']:>7.1f}s {100 * s['probe_seconds'] / s['wall_seconds']:>5.1f}%  {s['rounds']}")


if __name__ == "__main__":
    main()

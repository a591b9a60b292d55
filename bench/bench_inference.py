"""Inference benchmark: adapter switch latency and generation speed per mode.

    python bench/bench_inference.py [--model default] [--tokens 64] [--repeats 3] [--rank 16]

Prints, for the chosen base model (default: the embedded SmolLM2-135M-Instruct, fp32 on CPU):
  * switch latency between unmerged modes (one adapter, another, a 3-adapter mix, base) — a pointer
    change, target < 10 ms — and, for reference, entering/leaving merged mode (folds the weights);
  * generation tokens/s for the base model (with the adapters attached but off, and a second copy
    that never had any), merged, one unmerged adapter and a 3-adapter mix; merged should be within
    5 % of base.

Three rank-``--rank`` adapters on every linear layer are made on the spot (random B), so no training
run is needed. Every run generates exactly ``--tokens`` tokens (EOS held back) from the same prompt;
modes are interleaved over ``--repeats`` rounds and the median is reported, which keeps a busy
machine from favouring one mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lora_app.inference import GenerationSettings, InferenceEngine, Mode  # noqa: E402
from lora_app.lora import LoraConfig, adapter_modules, add_adapter, remove_adapter, save_adapter  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


def make_adapters(model, folder: Path, rank: int, count: int = 3, scale: float = 1e-3) -> list[Path]:
    """Save ``count`` random adapters for ``model`` (attached only while saving); ``scale``: the std of B."""
    folders = []
    for i in range(count):
        add_adapter(model, LoraConfig(rank=rank, alpha=2 * rank, targets="all-linear"), "bench_tmp")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for module in adapter_modules(model, "bench_tmp").values():
                module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * scale)
        folders.append(save_adapter(model, "bench_tmp", folder / f"adapter{i + 1}"))
        remove_adapter(model, "bench_tmp")
    return folders


def switch_latency(base, modes: list[Mode], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        for mode in modes:
            times.append(base.set_mode(mode) * 1000)
    return times


def tokens_per_s(base, mode: Mode, settings: GenerationSettings) -> float:
    result = base.generate(PROMPT, settings=settings, mode=mode)
    assert result.new_tokens == settings.max_new_tokens, result
    return result.tokens_per_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--switch-rounds", type=int, default=200)
    args = parser.parse_args(argv)

    settings = GenerationSettings(max_new_tokens=args.tokens, min_new_tokens=args.tokens, temperature=0.0)
    engine = InferenceEngine(device="cpu", dtype=torch.float32)
    start = time.perf_counter()
    base = engine.base(args.model)
    params = sum(p.numel() for p in base.model.parameters()) / 1e6
    print(f"model {args.model} ({type(base.model).__name__}, {params:.0f}M params, fp32, CPU, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load avg "
          f"{os.getloadavg()[0]:.1f}), loaded in {time.perf_counter() - start:.1f} s")

    # a second copy that never gets adapters: the "no LoRA wrappers at all" reference
    plain = InferenceEngine(device="cpu", dtype=torch.float32).base(args.model)

    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(base.model, Path(tmp), args.rank)
        start = time.perf_counter()
        names = [base.load_adapter(folder) for folder in folders]
        load_ms = (time.perf_counter() - start) * 1000 / len(names)
    size = base.adapters()[0].nbytes
    print(f"3 adapters, rank {args.rank} on all linear layers, {size / 2**20:.1f} MiB each, "
          f"loaded in {load_ms:.0f} ms each")

    unmerged = [Mode.of(names[0]), Mode.of(names[1]), Mode.of(names), Mode.base(), Mode.of(names[2])]
    switch_latency(base, unmerged, 5)  # warm-up
    times = switch_latency(base, unmerged, args.switch_rounds)
    merge_times = switch_latency(base, [Mode.of(names[0], merged=True), Mode.of(names[0])], 10)
    p95 = sorted(times)[int(0.95 * len(times))]
    verdict = "PASS" if statistics.median(times) < 10 else "FAIL"
    print(f"\nadapter switch (unmerged modes, {len(times)} switches): median {statistics.median(times):.2f} ms, "
          f"p95 {p95:.2f} ms, max {max(times):.2f} ms   [target < 10 ms: {verdict}]")
    print(f"enter/leave merged mode (folds/unfolds the weights): median {statistics.median(merge_times):.1f} ms")

    runs_on = {"base (adapters attached, off)": (base, Mode.base()),
               "base (no adapters ever attached)": (plain, Mode.base()),
               "merged (1 adapter)": (base, Mode.of(names[0], merged=True)),
               "1 adapter, unmerged": (base, Mode.of(names[0])),
               "3-adapter mix, unmerged": (base, Mode.of(names))}
    warm = settings.with_(max_new_tokens=16, min_new_tokens=16)
    for model, mode in runs_on.values():
        tokens_per_s(model, mode, warm)
    runs: dict[str, list[float]] = {label: [] for label in runs_on}
    for _ in range(args.repeats):  # interleaved, so a slow moment of the machine hits every mode alike
        for label, (model, mode) in runs_on.items():
            runs[label].append(tokens_per_s(model, mode, settings))
    speeds = {label: statistics.median(values) for label, values in runs.items()}
    print(f"\ngeneration, {args.tokens} new tokens, greedy, median of {args.repeats} (min-max):")
    reference = speeds["base (adapters attached, off)"]
    for label, speed in speeds.items():
        print(f"  {label:34s} {speed:6.1f} tokens/s  ({min(runs[label]):.1f}-{max(runs[label]):.1f})  "
              f"{speed / reference:6.1%} of base")
    for label in ("base (adapters attached, off)", "base (no adapters ever attached)"):
        ratio = speeds["merged (1 adapter)"] / speeds[label]
        verdict = "PASS" if abs(ratio - 1) <= 0.05 else "FAIL"
        print(f"merged vs {label}: {ratio - 1:+.1%}   [target within ±5 %: {verdict}]")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference benchmark: generation speed per mode beside plain transformers, and adapter switch latency.

    python bench/bench_inference.py [--model default] [--tokens 64] [--repeats 3] [--rank 16]

Prints, for the chosen base model (default: the embedded SmolLM2-135M-Instruct) on this machine's
CPU (named, with its bf16 support):
  * generation tokens/s of plain transformers ``generate`` in fp32 and in bf16 (its best setting is
    the faster of the two), beside the studio in the precision it picks itself: the base model with
    the adapters attached but off, a second copy that never had any (and a third, the control:
    two identical copies differ only by the machine's noise and where their weights lie in memory),
    merged, one adapter unmerged and a 3-adapter mix; then the targets: base and merged >= 1.5x
    plain transformers at its best on a CPU with native bf16 (no slower than plain fp32 without
    it), merged within 3 % of the never-adapted base (printed beside the control's gap), one
    unmerged adapter >= 85 % of merged;
  * the time of a 300-token prompt's pass, plain fp32, plain bf16 and the studio's (on a CPU without
    native bf16, bf16 prompt passes are emulated and slow: the studio holds bf16 weights there but
    computes prompts in fp32);
  * switch latency between unmerged modes (a pointer change, target < 10 ms) and, for reference,
    entering/leaving merged mode (folds the weights).

Both sides run in this one process, on the pages the machine gives by default (a plain script's
conditions); ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/bench_inference.py`` runs both on
transparent huge pages, as the studio's own generating processes run (``lora_app.allocator``).

Three rank-``--rank`` adapters on every linear layer are made on the spot (random B), so no training
run is needed. Every run generates exactly ``--tokens`` tokens (EOS held back) from the same prompt;
all rows are interleaved over ``--repeats`` rounds, so a slow moment of a busy machine hits every row
alike, and each row's median is compared (on a shared 2-core VM single rounds vary by 10-30 %).
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
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from lora_app import allocator  # noqa: E402
from lora_app.hardware import cpu_name, generation_precision, native_bf16_cpu  # noqa: E402
from lora_app.inference import GenerationSettings, InferenceEngine, Mode  # noqa: E402
from lora_app.inference.prompts import encode_prompt  # noqa: E402
from lora_app.models import resolve_model_path  # noqa: E402
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


def studio_run(base, mode: Mode, settings: GenerationSettings):
    def run() -> float:
        result = base.generate(PROMPT, settings=settings, mode=mode)
        assert result.new_tokens == settings.max_new_tokens, result
        return result.tokens_per_s
    return run


def plain_run(model, ids: dict, config):
    """Plain transformers ``generate``, timed around the call as a user would time it."""
    def run() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(**ids, generation_config=config)
            seconds = time.perf_counter() - start
        new = out.shape[1] - ids["input_ids"].shape[1]
        assert new == config.max_new_tokens, new
        return new / seconds
    return run


def prompt_pass_ms(model, length: int = 300) -> float:
    ids = torch.randint(100, 10_000, (1, length))
    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1)
        start = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
    return (time.perf_counter() - start) * 1000


def machine() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, native bf16: "
            f"{native_bf16_cpu() or 'no'}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"memory: {pages()}")


def pages() -> str:
    if allocator.HUGE_PAGES in os.environ.get("GLIBC_TUNABLES", ""):
        return "huge pages asked for (GLIBC_TUNABLES), as the studio's processes run"
    return "the machine's default pages (as a plain script runs)"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--switch-rounds", type=int, default=200)
    args = parser.parse_args(argv)

    settings = GenerationSettings(max_new_tokens=args.tokens, min_new_tokens=args.tokens, temperature=0.0)
    precision = generation_precision("cpu")
    print(f"machine: {machine()}, load avg {os.getloadavg()[0]:.1f}")
    start = time.perf_counter()
    base = InferenceEngine(device="cpu").base(args.model)
    params = sum(p.numel() for p in base.model.parameters()) / 1e6
    print(f"model {args.model} ({type(base.model).__name__}, {params:.0f}M params), loaded in "
          f"{time.perf_counter() - start:.1f} s; the studio generates in {precision.label} ({precision.reason})")
    plain = InferenceEngine(device="cpu").base(args.model)  # never gets adapters: the "no LoRA wrappers" reference
    control = InferenceEngine(device="cpu").base(args.model)  # a second such copy: what "the same model" varies by
    path = resolve_model_path(args.model)
    reference = {name: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
                 for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(base.model, Path(tmp), args.rank)
        start = time.perf_counter()
        names = [base.load_adapter(folder) for folder in folders]
        load_ms = (time.perf_counter() - start) * 1000 / len(names)
    size = base.adapters()[0].nbytes
    print(f"3 adapters, rank {args.rank} on all linear layers, {size / 2**20:.1f} MiB each, "
          f"loaded in {load_ms:.0f} ms each")

    ids = encode_prompt(base.tokenizer, PROMPT)
    config = settings.generation_config(base.eos_token_ids, base.tokenizer.pad_token_id)
    rows = {f"plain transformers generate, {name}": plain_run(model, ids, config) for name, model in reference.items()}
    rows |= {"studio, base (no adapter ever attached)": studio_run(plain, Mode.base(), settings),
             "studio, base (no adapter ever attached), control copy": studio_run(control, Mode.base(), settings),
             "studio, base (adapters attached, off)": studio_run(base, Mode.base(), settings),
             "studio, merged (1 adapter)": studio_run(base, Mode.of(names[0], merged=True), settings),
             "studio, 1 adapter, unmerged": studio_run(base, Mode.of(names[0]), settings),
             "studio, 3-adapter mix, unmerged": studio_run(base, Mode.of(names), settings)}
    warm = settings.with_(max_new_tokens=8, min_new_tokens=8)
    for name, model in reference.items():
        plain_run(model, ids, warm.generation_config(base.eos_token_ids, base.tokenizer.pad_token_id))()
    for mode in (Mode.base(), Mode.of(names[0], merged=True), Mode.of(names[0]), Mode.of(names)):
        base.generate(PROMPT, settings=warm, mode=mode)
    plain.generate(PROMPT, settings=warm)
    control.generate(PROMPT, settings=warm)
    runs: dict[str, list[float]] = {label: [] for label in rows}
    for _ in range(args.repeats):  # interleaved, so a slow moment of the machine hits every row alike
        for label, run in rows.items():
            runs[label].append(run())
    speeds = {label: statistics.median(values) for label, values in runs.items()}
    best_plain = max((label for label in speeds if label.startswith("plain")), key=speeds.get)
    print(f"\ngeneration, {args.tokens} new tokens, greedy, median of {args.repeats} (min-max), "
          f"prompt {ids['input_ids'].shape[1]} tokens:")
    for label, speed in speeds.items():
        print(f"  {label:65s} {speed:6.1f} tokens/s  ({min(runs[label]):5.1f}-{max(runs[label]):5.1f})  "
              f"{speed / speeds[best_plain]:5.2f}x plain at its best")

    studio = {kind: speeds[f"studio, {kind}"] for kind in
              ("base (no adapter ever attached)", "merged (1 adapter)", "1 adapter, unmerged")}
    plain_fp32 = speeds["plain transformers generate, fp32"]
    if native_bf16_cpu():
        goal, against, reference_speed = 1.5, best_plain, speeds[best_plain]
    else:
        goal, against, reference_speed = 1.0, "plain transformers generate, fp32", plain_fp32
    print(f"\ntargets ({'native bf16 CPU' if native_bf16_cpu() else 'CPU without native bf16'}):")
    for kind in ("base (no adapter ever attached)", "merged (1 adapter)"):
        ratio = studio[kind] / reference_speed
        print(f"  studio {kind} vs {against}: {ratio:.2f}x   [>= {goal:.1f}x: {verdict(ratio >= goal)}]")
    merged_gap = studio["merged (1 adapter)"] / studio["base (no adapter ever attached)"] - 1
    control_gap = speeds["studio, base (no adapter ever attached), control copy"] / studio["base (no adapter ever attached)"] - 1
    print(f"  merged vs never-adapted base: {merged_gap:+.1%}   [within 3 %: {verdict(abs(merged_gap) <= 0.03)}]"
          f"   (control: an identical never-adapted copy {control_gap:+.1%})")
    share = studio["1 adapter, unmerged"] / studio["merged (1 adapter)"]
    print(f"  1 adapter unmerged vs merged: {share:.1%}   [>= 85 %: {verdict(share >= 0.85)}]")

    passes = {f"plain {name}": prompt_pass_ms(model) for name, model in reference.items()}
    passes[f"studio ({precision.label})"] = prompt_pass_ms(plain.model)
    print("\na 300-token prompt's pass: " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in passes.items()))

    unmerged = [Mode.of(names[0]), Mode.of(names[1]), Mode.of(names), Mode.base(), Mode.of(names[2])]
    switch_latency(base, unmerged, 5)  # warm-up
    times = switch_latency(base, unmerged, args.switch_rounds)
    merge_times = switch_latency(base, [Mode.of(names[0], merged=True), Mode.of(names[0])], 10)
    p95 = sorted(times)[int(0.95 * len(times))]
    print(f"\nadapter switch (unmerged modes, {len(times)} switches): median {statistics.median(times):.2f} ms, "
          f"p95 {p95:.2f} ms, max {max(times):.2f} ms   [target < 10 ms: {verdict(statistics.median(times) < 10)}]")
    print(f"enter/leave merged mode (folds/unfolds the weights): median {statistics.median(merge_times):.1f} ms")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

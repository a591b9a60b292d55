"""The GPU path checked end to end by one script: training speed and memory against transformers
Trainer + peft, then generation, the worker and the memory estimate on the same GPU.

    python bench/gpu_check.py [--out-dir DIR]          # on a GPU: under 8 minutes, one table
    python bench/gpu_check.py --gradient-checkpointing both --budget 600   # also both recipes with it on
    python bench/gpu_check.py --shapes tiny            # what a CPU runs (the default without a GPU)

Models are built from configs with random weights (speed and memory do not depend on the values), with
the embedded model's tokenizer (``--tokenizer``: any tokenizer folder):

    smollm2-135m   the embedded default's shape (Llama, 30 layers, hidden 576)
    llama-1b       Llama-3.2-1B's shape (16 layers, hidden 2048, 32/8 heads) on SmolLM2's vocabulary
    tiny           2 layers, hidden 64: runs anywhere in seconds

Training: both recipes train ``warmup + steps`` steps over the same rows of the alpaca demo data
(a seeded sample, one epoch, tokenized by our pipeline, prompts masked), with the same LoRA (r16, α32,
dropout 0.05, all linear layers), AdamW at 2e-4 with a cosine schedule, batch size and precision:

    Trainer+peft   bf16 (the model loaded in bf16, bf16 autocast), SDPA attention, random batches padded
                   per batch (DataCollatorForSeq2Seq); QLoRA: BitsAndBytesConfig nf4, double quant, bf16
                   compute, prepare_model_for_kbit_training — the recipe of the peft and QLoRA docs
    studio         ``lora_app.training.train`` with its defaults (precision auto)

Measured per side, each in a process of its own: useful tokens/s (labelled tokens per second over the
steps after the warm-up), the process's peak ``torch.cuda`` memory (its peak RSS on a CPU), the mean
loss over all steps (both sides train on the same rows, one epoch, in different orders: the studio
groups rows by length, so one step's loss or the last few steps' compare batches, not recipes), each
step's seconds (in the JSON), and for the studio its memory estimate. Sides past ``--budget``
seconds are skipped, so a slow machine still gets its table.

On a machine without network whose Python has torch, accelerate, safetensors, tokenizers and pandas,
the rest travels as wheels of our pins, installed with ``pip install --no-deps``: transformers, peft,
bitsandbytes, and gguf (the inference package reads GGUF files, so the generation check imports it).

Checks on the same device: merged vs unmerged greedy generation (bf16 and fp32), adapter switch time,
generation tokens/s (plain transformers ``generate``, the studio's base, merged, one adapter, a
3-adapter mix); a job submitted to the worker runs on the GPU and the memory its charts plot is the
allocator's. Every figure also goes to ``DIR/gpu_check.json``, each side's log to ``DIR/sides.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
GIB = 2**30
SHAPES = {  # LlamaConfig fields; the vocabulary comes from the tokenizer
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                         rope_parameters=dict(rope_theta=100000.0, rope_type="default")),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_parameters=dict(rope_theta=500000.0, rope_type="default")),
}
MODES = {"lora": "none", "qlora": "4bit"}  # the check's name -> the studio's quantization setting
LORA = dict(rank=16, alpha=32, dropout=0.05)
PROMPT = "Write a short story about a robot who learns to paint."


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory() -> int:
    """This process's peak: the CUDA allocator's on a GPU, RSS on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


# ---- the models -----------------------------------------------------------------------------------
def build_model(shape: str, tokenizer_dir: str, folder: Path) -> Path:
    """A model folder of ``shape`` with random weights (bf16 where the device computes it) and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


# ---- one training side (runs in a process of its own) ----------------------------------------------
def train_studio(spec: dict) -> dict:
    from lora_app.training import trainer
    from lora_app.training.config import TrainConfig
    from lora_app.training.trainer import Callbacks, train

    if not spec.get("grouped", True):  # the ablation: each adapter its own node (lora/group.py)
        trainer.group_shared_inputs = lambda model: 0
    marks = {}

    def on_log(step: int, values: dict) -> None:
        if "tokens" in values:
            marks[step] = (sync(), values["tokens"], values["loss"])

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(data=spec["data"], model=spec["model"], output=str(Path(tmp) / "run"), targets="all-linear",
                             max_steps=spec["warmup"] + spec["steps"], batch_size=spec["batch_size"],
                             seq_len=spec["seq_len"], lr=2e-4, scheduler="cosine", warmup=0, seed=0, log_every=1,
                             quantization=MODES[spec["mode"]], gradient_checkpointing=spec["gradient_checkpointing"],
                             **LORA)
        # the trainer's own lines (what it fused, the precision) go to sides.log
        summary = train(config, Callbacks(on_log=on_log, log=lambda text: print(text, file=sys.stderr, flush=True))).summary
    (t0, tokens0, _), (t1, tokens1, _) = marks[spec["warmup"]], marks[max(marks)]
    return dict(tokens_per_s=(tokens1 - tokens0) / (t1 - t0), peak_bytes=peak_memory(),
                mean_loss=statistics.fmean(loss for _, _, loss in marks.values()),
                step_seconds=step_seconds([marks[step][0] for step in sorted(marks)]),
                estimate_bytes=summary["memory_estimate_bytes"], precision=summary["precision"],
                device=summary["device"])


def train_peer(spec: dict) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, \
        TrainerCallback, TrainingArguments

    from lora_app.data import prepare_dataset
    from lora_app.hardware import choose_precision
    from lora_app.models import load_tokenizer

    bf16 = choose_precision("auto", device()).name == "bf16"  # the peer's best: what the hardware computes natively
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = load_tokenizer(spec["model"])
    data = prepare_dataset(spec["data"], tokenizer, seq_len=spec["seq_len"], seed=0)
    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if spec["mode"] == "qlora":
        kwargs.update(device_map={"": device()}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs)
    if spec["mode"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["gradient_checkpointing"])
    model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    batch_tokens = []  # per batch in the order they are collated, which is the order they are trained

    def collator(features):
        batch = pad([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        batch_tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks[state.global_step] = sync()
            if state.global_step == spec["warmup"]:
                marks["start"] = marks[state.global_step]

        def on_train_end(self, *a, **kw):
            marks["end"] = sync()

    total = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=total, per_device_train_batch_size=spec["batch_size"], learning_rate=2e-4,
            lr_scheduler_type="cosine", warmup_steps=0, save_strategy="no", report_to=[],
            # every few steps, as users log (each log syncs the GPU), and always at the last step
            logging_steps=next(n for n in (5, 4, 3, 2, 1) if total % n == 0),
            bf16=bf16, use_cpu=device() == "cpu", seed=0, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
            gradient_checkpointing=spec["gradient_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False})  # as the studio: LoRA's inputs need no grad
        trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=collator, callbacks=[Clock()])
        trainer.train()
    # each logged loss is the mean of an equal window of steps, so their mean is the run's
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens = sum(batch_tokens[spec["warmup"]:total])
    return dict(tokens_per_s=tokens / (marks["end"] - marks["start"]), peak_bytes=peak_memory(), mean_loss=statistics.fmean(losses),
                step_seconds=step_seconds([marks[step] for step in range(1, total + 1)]),
                precision="bf16" if bf16 else "fp32", device=str(model.device))


def step_seconds(ends: list[float]) -> list[float]:
    """Each step's duration from the times the steps ended (the first has no start and is left out):
    shows in the JSON whether the timed steps were steady."""
    return [round(b - a, 4) for a, b in zip(ends, ends[1:])]


# ---- generation and worker checks (each in a process of its own) ----------------------------------
def check_generation(spec: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from bench_inference import make_adapters, studio_run, switch_latency
    from lora_app.inference import GenerationSettings, InferenceEngine, Mode

    tokens = spec["tokens"]
    settings = GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the engine's own choice (bf16 on a GPU), then fp32 where that differs
        for dtype in (None, torch.float32):
            base = InferenceEngine(device="auto", dtype=dtype, work_dir=tmp).base(spec["model"])
            label = str(base.model.dtype).removeprefix("torch.")
            if dtype is not None and label == out["generation_dtype"]:
                break
            folders = make_adapters(base.model, Path(tmp) / label, rank=16, scale=0.02)
            names = [base.load_adapter(folder) for folder in folders]
            print(f"{label}: base loaded, adapters made", file=sys.stderr, flush=True)
            unmerged = base.generate(PROMPT, settings=settings, mode=Mode.of(names[0])).text
            merged = base.generate(PROMPT, settings=settings, mode=Mode.of(names[0], merged=True)).text
            plain_base = base.generate(PROMPT, settings=settings, mode=Mode.base()).text
            out[f"merged_equals_unmerged_{label}"] = merged == unmerged
            out[f"first_difference_{label}"] = next((i for i, (a, b) in enumerate(zip(merged, unmerged)) if a != b),
                                                    None if merged == unmerged else min(len(merged), len(unmerged)))
            out[f"adapter_changes_output_{label}"] = unmerged != plain_base
            if dtype is not None:
                continue
            modes = [Mode.of(names[0]), Mode.of(names[1]), Mode.of(names), Mode.base()]
            switch_latency(base, modes, 3)
            times = switch_latency(base, modes, 50)
            out["switch_ms_median"] = statistics.median(times)
            out["merge_ms_median"] = statistics.median(switch_latency(base, [Mode.of(names[0], merged=True),
                                                                             Mode.of(names[0])], 5))
            plain = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=base.model.dtype).to(base.model.device)
            ids = base.tokenizer(PROMPT, return_tensors="pt").input_ids.to(base.model.device)
            speeds = {"transformers generate": lambda: plain_generate(plain, ids, tokens),
                      "studio base": studio_run(base, Mode.base(), settings),
                      "studio merged": studio_run(base, Mode.of(names[0], merged=True), settings),
                      "studio 1 adapter": studio_run(base, Mode.of(names[0]), settings),
                      "studio 3-adapter mix": studio_run(base, Mode.of(names), settings)}
            runs = {what: [] for what in speeds}
            for _ in range(spec["repeats"] + 1):  # interleaved; the first round warms up
                for what, measure in speeds.items():
                    runs[what].append(measure())
                    print(f"{what}: {runs[what][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
            out["generation_tokens_per_s"] = {what: statistics.median(v[1:]) for what, v in runs.items()}
            out["generation_dtype"] = label
    return out


def plain_generate(model, ids, tokens: int) -> float:
    start = sync()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (sync() - start)


def check_worker(spec: dict) -> dict:
    from lora_app.training import worker
    from lora_app.training.config import TrainConfig
    from lora_app.training.store import RunStore

    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "store")
        config = TrainConfig(data=spec["data"], model=spec["model"], max_steps=10, batch_size=spec["batch_size"],
                             seq_len=spec["seq_len"], log_every=1, targets="all-linear", **LORA)
        run = worker.submit(config, store)
        deadline = time.time() + 240
        while store.get(run.id).status in ("queued", "running") and time.time() < deadline:
            worker.refresh(store)
            time.sleep(1)
        run = store.get(run.id)
        metrics = store.metrics(run.id)
        if run.status != "completed":
            return dict(status=run.status, error=(run.error or "")[-2000:], log=worker.log_tail(run))
    key = "cuda_peak_bytes" if run.summary["device"].startswith("cuda") else "peak_rss_bytes"
    charted = [m[key] for m in metrics if m.get(key) is not None]
    peak = run.summary["peak_memory_bytes"]
    # the chart's last point is the last step's; saving the adapter after it may add a little (on a CPU)
    match = bool(charted) and abs(max(charted) - peak) <= 0.01 * peak
    return dict(status=run.status, device=run.device, trained_on=run.summary["device"], charted_key=key,
                charted_peak_bytes=max(charted) if charted else None, measured_peak_bytes=peak, match=match,
                gpu_series=sorted({k for m in metrics for k in m if k.startswith("cuda_")}))


SIDES = {"studio": train_studio, "peer": train_peer, "generation": check_generation, "worker": check_worker}


# ---- the parent: build, run each side in its own process, print the table --------------------------
def run_side(spec: dict, log, timeout: float) -> dict:
    started = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, __file__, "--side", json.dumps(spec)], capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        returncode, stdout, stderr = out.returncode, out.stdout, out.stderr
    except subprocess.TimeoutExpired as err:  # its output so far comes as bytes, whatever text= said
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
        returncode, stdout, stderr = "timeout", "", stderr + f"\ntimed out after {timeout:.0f} s"
    seconds = time.perf_counter() - started
    log.write(f"==== {json.dumps(spec)}  rc={returncode}  {seconds:.0f} s\n{stderr[-6000:]}\n")
    log.flush()
    if returncode == 0:
        return {**json.loads(stdout.strip().splitlines()[-1]), "seconds": seconds}
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    return dict(error=(last[-1] if last else f"exit {returncode}")[:300], seconds=seconds)


def machine() -> str:
    import platform

    import transformers

    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for name in ("peft", "bitsandbytes"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except Exception as err:  # noqa: BLE001 - a missing or broken package is reported, not fatal
            parts.append(f"{name} unavailable ({type(err).__name__})")
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {platform.processor() or ''}".strip()
    return f"{where}; {', '.join(parts)}"


def training_table(results: list[dict]) -> list[str]:
    lines = [f"{'shape':13} {'mode':6} {'gc':3} {'recipe':13} {'tokens/s':>9} {'peak GiB':>9} {'loss':>7} "
             f"{'speed':>6} {'memory':>7} {'estimate GiB':>13}"]
    for r in results:
        head = f"{r['shape']:13} {r['mode']:6} {'on' if r['gc'] else 'off':3} {r['recipe']:13}"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']}")
            continue
        peer = next((p for p in results if p["recipe"] == "Trainer+peft" and "error" not in p
                     and all(p[k] == r[k] for k in ("shape", "mode", "gc"))), None)
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:5.2f}x {r['peak_bytes'] / peer['peak_bytes']:6.2f}x" \
            if peer and r is not peer else f"{'':6} {'':7}"
        estimate = f"{r['estimate_bytes'] / GIB:6.2f} ({r['estimate_bytes'] / r['peak_bytes'] - 1:+.0%})" \
            if "estimate_bytes" in r else ""
        lines.append(f"{head} {r['tokens_per_s']:9.0f} {r['peak_bytes'] / GIB:9.2f} {r['mean_loss']:7.3f} "
                     f"{ratio} {estimate:>13}")
    return lines


def check_lines(generation: dict, worker: dict) -> list[str]:
    lines = []
    if "error" in generation:
        lines.append(f"generation checks failed: {generation['error']}")
    else:
        for dtype in ("bfloat16", "float32"):
            if f"merged_equals_unmerged_{dtype}" in generation:
                same = generation[f"merged_equals_unmerged_{dtype}"]
                lines.append(f"merged vs unmerged greedy text, {dtype}: "
                             + ("identical" if same else f"differs from character {generation[f'first_difference_{dtype}']}")
                             + ("" if generation[f"adapter_changes_output_{dtype}"] else "  (the adapter changed nothing!)"))
        lines.append(f"adapter switch (unmerged modes): median {generation['switch_ms_median']:.2f} ms; "
                     f"enter/leave merged: median {generation['merge_ms_median']:.1f} ms")
        speeds = generation["generation_tokens_per_s"]
        plain = speeds["transformers generate"]
        lines.append(f"generation tokens/s ({generation['generation_dtype']}, greedy): "
                     + ", ".join(f"{label} {v:.0f} ({v / plain:.2f}x)" for label, v in speeds.items()))
    if "error" in worker or worker.get("status") != "completed":
        lines.append(f"worker check failed: {worker.get('error')} {worker.get('log', '')[-500:]}")
    else:
        charted, peak, match = worker["charted_peak_bytes"], worker["measured_peak_bytes"], worker["match"]
        lines.append(f"worker: queued run trained on {worker['trained_on']} (store says {worker['device']}); "
                     f"charted GPU series {worker['gpu_series'] or 'none'}; charted {worker['charted_key']} "
                     f"{(charted or 0) / GIB:.3f} GiB vs the run's measured peak {peak / GIB:.3f} GiB: "
                     + ("match" if match else "MISMATCH"))
    return lines


def save(out_dir: Path, args, results: list[dict], generation: dict, worker: dict) -> None:
    (out_dir / "gpu_check.json").write_text(json.dumps(dict(machine=machine(), settings=vars(args), training=results,
                                                            generation=generation, worker=worker), indent=1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", help=argparse.SUPPRESS)  # one side's spec, as JSON (run by the parent)
    on_gpu = torch.cuda.is_available()
    p.add_argument("--shapes", default="llama-1b,smollm2-135m" if on_gpu else "tiny",
                   help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--modes", default="lora,qlora", help="comma list of lora (bf16 where native), qlora (nf4)")
    p.add_argument("--steps", type=int, default=40 if on_gpu else 4, help="timed steps")
    p.add_argument("--warmup", type=int, default=5 if on_gpu else 2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=8 if on_gpu else 2)
    p.add_argument("--seq-len", type=int, default=512 if on_gpu else 128)
    p.add_argument("--gradient-checkpointing", choices=("off", "on", "both"), default="off",
                   help="both recipes; both: each shape and mode with it off, then on")
    p.add_argument("--budget", type=float, default=330, help="seconds of training sides; later ones are skipped")
    p.add_argument("--tokens", type=int, default=32 if on_gpu else 8, help="new tokens per generation")
    p.add_argument("--repeats", type=int, default=2 if on_gpu else 1)
    p.add_argument("--data", default=str(ALPACA), help="alpaca-format JSON")
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the embedded model's)")
    p.add_argument("--out-dir", default=None, help="write gpu_check.json and sides.log here")
    p.add_argument("--side-timeout", type=float, default=150, help="seconds one side may take")
    p.add_argument("--ungrouped", action="store_true",
                   help="also time the studio with every adapter its own node (what grouping q, k, v and gate, up gains)")
    args = p.parse_args()
    if args.side:
        spec = json.loads(args.side)
        print(json.dumps(SIDES[spec["side"]](spec)))
        return 0

    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None:
        from lora_app.models import default_model_path

        args.tokenizer = str(default_model_path())
    print(f"gpu check on {machine()}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, open(out_dir / "sides.log", "w") as log:
        rows = json.loads(Path(args.data).read_text())
        sample = random.Random(0).sample(rows, (args.warmup + args.steps) * args.batch_size)
        data = Path(tmp) / "sample.json"
        data.write_text(json.dumps(sample))
        common = dict(data=str(data), warmup=args.warmup, steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len)
        print(f"training: {args.warmup}+{args.steps} steps of batch {args.batch_size}, seq-len <= {args.seq_len}, "
              f"{len(sample)} rows of {Path(args.data).name}, LoRA r{LORA['rank']} alpha {LORA['alpha']} all linear "
              f"layers", flush=True)
        shapes = args.shapes.split(",")
        models = {shape: build_model(shape, args.tokenizer, Path(tmp) / shape) for shape in shapes}
        # the checks run on the embedded model's shape, or the last one asked for
        small = dict(common, model=str(models.get("smollm2-135m", models[shapes[-1]])), tokens=args.tokens,
                     repeats=args.repeats)
        gcs = {"off": (False,), "on": (True,), "both": (False, True)}[args.gradient_checkpointing]
        results, deadline = [], time.perf_counter() + args.budget
        print(training_table([])[0], flush=True)
        for shape, gc, mode in [(s, g, m) for s in shapes for g in gcs for m in args.modes.split(",")]:
            recipes = [("Trainer+peft", "peer", True), ("studio", "studio", True)]
            recipes += [("studio ungrp", "studio", False)] if args.ungrouped else []
            for recipe, side, grouped in recipes:
                spec = dict(common, side=side, model=str(models[shape]), mode=mode, gradient_checkpointing=gc,
                            grouped=grouped)
                outcome = run_side(spec, log, args.side_timeout) if time.perf_counter() < deadline \
                    else dict(error=f"skipped: past the --budget of {args.budget:.0f} s")
                results.append(dict(shape=shape, mode=mode, gc=gc, recipe=recipe, **outcome))
                print(training_table(results)[-1], flush=True)
                save(out_dir, args, results, {}, {})  # so far: what a stopped run leaves
        generation = run_side(dict(small, side="generation"), log, args.side_timeout)
        worker = run_side(dict(small, side="worker"), log, args.side_timeout)
    lines = [f"gpu check on {machine()}", *training_table(results), *check_lines(generation, worker),
             f"total {time.perf_counter() - started:.0f} s"]
    print("\n" + "\n".join(lines))
    save(out_dir, args, results, generation, worker)
    print(f"figures: {out_dir / 'gpu_check.json'}  logs: {out_dir / 'sides.log'}")
    failed = any("error" in r for r in results) or "error" in generation or worker.get("status") != "completed"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

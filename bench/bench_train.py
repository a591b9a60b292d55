"""Training speed and memory: our `train` against the standard transformers Trainer + peft recipe.

    python bench/bench_train.py [--steps 12] [--batch-size 4] [--seq-len 256] [--peer-precision fp32]

Three sides train the same model (the embedded SmolLM2-135M-Instruct) for one epoch over the same
``steps x batch-size`` rows (a seeded sample of the shared alpaca demo data, prompts masked, tokenized by
our data pipeline), so all see exactly the same examples and tokens, with the same LoRA (rank 16,
alpha 32, dropout 0.05, q/k/v/o), optimizer (AdamW, lr 2e-4, cosine) and batch size, each in a fresh
process so its peak RSS is its own:

    peer    transformers Trainer + peft at its best precision on this machine (bf16 autocast where
            the CPU or GPU computes bf16 natively, else fp32; --peer-precision forces one)
    ours    the studio's `train` with its default settings (precision auto)
    qlora   the same with the base quantized to 4 bits (NF4)

The studio's sides run on the allocator its training commands use (jemalloc where the machine has
it, see ``lora_app.allocator``), the peer on the C library's, as its recipe runs. Printed per side:
useful tokens/s (non-padding tokens that carry a label, per second of the training loop), peak RSS,
the mean training loss over the epoch (the mean of the steps' losses, as the Trainer reports it), the
allocator, and the ratios to the peer. The first line names the CPU and its bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
TARGETS = "q_proj,k_proj,v_proj,o_proj"
sys.path.insert(0, str(ROOT))

from lora_app import allocator  # noqa: E402


def run_ours(args) -> dict:
    import tempfile

    from lora_app.training.config import TrainConfig
    from lora_app.training.trainer import Callbacks, train

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(data=args.data, output=str(Path(tmp) / "run"), rank=16, alpha=32, dropout=0.05,
                             targets=TARGETS, epochs=1, batch_size=args.batch_size, seq_len=args.seq_len,
                             lr=2e-4, scheduler="cosine", warmup=0, seed=0, precision=args.precision,
                             gradient_checkpointing=args.gradient_checkpointing,
                             quantization="4bit" if args.side == "qlora" else "none")
        losses = []
        summary = train(config, Callbacks(log=lambda text: None,
                                          on_log=lambda step, values: losses.append(values["loss"]))).summary
    return dict(useful_tokens_per_second=summary["useful_tokens_per_second"], train_tokens=summary["train_tokens"],
                allocator=allocator.in_use(),
                seconds=summary["wall_seconds"], peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                mean_loss=sum(losses) / len(losses), precision=summary["precision"])


def run_peer(args) -> dict:
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, \
        TrainingArguments

    from lora_app.data import prepare_dataset
    from lora_app.models import default_model_path, load_tokenizer

    tokenizer = load_tokenizer("default")
    data = prepare_dataset(args.data, tokenizer, seq_len=args.seq_len, seed=0)
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS.split(","),
                                             task_type="CAUSAL_LM"))
    counted = {"tokens": 0}
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collator(features):
        batch = pad([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        counted["tokens"] += int((batch["labels"][:, 1:] != -100).sum())
        return batch

    timing = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            timing["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            timing["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, num_train_epochs=1, per_device_train_batch_size=args.batch_size, learning_rate=2e-4,
            lr_scheduler_type="cosine", warmup_steps=0, logging_steps=10, save_strategy="no", report_to=[],
            bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(), seed=0,
            dataloader_num_workers=0, remove_unused_columns=False, gradient_checkpointing=args.gradient_checkpointing)
        trainer = Trainer(model=model, args=training_args, train_dataset=data.train, data_collator=collator,
                          callbacks=[Clock()])
        result = trainer.train()
    seconds = timing["end"] - timing["start"]
    return dict(useful_tokens_per_second=counted["tokens"] / seconds, train_tokens=counted["tokens"], seconds=seconds,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                mean_loss=result.training_loss, precision=args.precision, allocator=allocator.in_use())


def side(name: str, args) -> dict:
    command = [sys.executable, __file__, "--side", name, "--data", args.data, "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len),
               "--precision", args.peer_precision if name == "peer" else args.precision, "--steps", str(args.steps)]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if name != "peer":  # the allocator the studio's training commands run on (the peer's recipe: the C library's)
        env = allocator.training_environment(env)
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["peer", "ours", "qlora"])
    p.add_argument("--data", help=argparse.SUPPRESS)  # the sample, written by the parent process
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--precision", default="auto", help="ours")
    p.add_argument("--peer-precision", default=None, help="fp32 or bf16 (default: the faster on this hardware)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()
    if args.side:
        result = (run_peer if args.side == "peer" else run_ours)(args)
        print(json.dumps(result))
        return
    import random
    import tempfile

    import torch

    from lora_app.hardware import choose_precision, cpu_name, native_bf16_cpu

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.peer_precision is None:  # the peer's best: bf16 autocast where the hardware computes it natively
        args.peer_precision = "fp32" if choose_precision("auto", device).name == "fp32" else "bf16"
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, native bf16: {native_bf16_cpu() or 'no'}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if device == "cuda" else ""))

    rows = json.loads(ALPACA.read_text())
    sample = random.Random(0).sample(rows, args.steps * args.batch_size)
    print(f"model: SmolLM2-135M-Instruct  data: {len(sample)} rows of {ALPACA.name}  {args.steps} steps of batch "
          f"{args.batch_size}  seq-len {args.seq_len}  peer precision {args.peer_precision}")
    with tempfile.TemporaryDirectory() as tmp:
        args.data = str(Path(tmp) / "sample.json")
        Path(args.data).write_text(json.dumps(sample))
        results = {name: side(name, args) for name in ("peer", "ours", "qlora")}
    peer = results["peer"]
    for name, r in results.items():
        speed, rss = r["useful_tokens_per_second"], r["peak_rss_bytes"]
        print(f"{name:5s} {r['precision']:5s} useful tokens/s {speed:7.1f} ({speed / peer['useful_tokens_per_second']:.2f}x)"
              f"  peak RSS {rss / 2**30:5.2f} GiB ({rss / peer['peak_rss_bytes']:.2f}x)"
              f"  mean loss {r['mean_loss']:.3f}  ({r['train_tokens']} tokens in {r['seconds']:.1f} s; "
              f"memory from {r['allocator']})")


if __name__ == "__main__":
    main()

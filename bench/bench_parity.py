"""Learning parity: does the studio's adapter learn as well as transformers Trainer + peft's?

    python bench/bench_parity.py [--datasets persona,alpaca] [--seeds 0,1,2] [--batching grouped,random] [--dropout 0]

Both recipes train the embedded SmolLM2-135M-Instruct on the same rows with the same settings (LoRA
r8, alpha 16 on q,k,v,o, dropout 0; batch 4, seq-len <= 256; AdamW lr 1e-3, linear schedule without
warmup; 3 epochs; the same seed), then one independent evaluator scores every adapter: peft loads it
onto the base, and the score is the mean cross-entropy per answer token over held-out rows (prompts
masked, tokenized by our pipeline, computed from plain transformers logits).

    persona   48 rows of the studio's demo persona (assets/demo_captain_byte.jsonl): 36 train, 12 held out
    alpaca    48 rows of ../shared/data/alpaca_en_demo.json: 32 train, 16 held out

Each studio batching (``--batching``) is one side; the Trainer + peft side draws random batches as
Trainer does. Printed per dataset and side: the held-out loss per seed, its mean and spread, and the
ratio of the mean to Trainer + peft's (the goal: <= 1.02 with default settings).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lora_app.data import prepare_dataset  # noqa: E402
from lora_app.hardware import choose_precision  # noqa: E402
from lora_app.models import default_model_path, load_tokenizer  # noqa: E402
from lora_app.training.config import TrainConfig  # noqa: E402
from lora_app.training.trainer import Callbacks, train  # noqa: E402

DATASETS = {"persona": (ROOT / "assets" / "demo_captain_byte.jsonl", 12),
            "alpaca": (ROOT.parent / "shared" / "data" / "alpaca_en_demo.json", 16)}
ROWS = 48
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RECIPE = dict(rank=8, alpha=16, dropout=0.0, batch_size=4, seq_len=256, lr=1e-3, epochs=3)
PEER = "Trainer+peft"


def split(name: str, folder: Path) -> tuple[Path, Path]:
    """(train file, held-out file): a seeded sample of ``ROWS`` rows, the first few held out."""
    path, held_out = DATASETS[name]
    text = path.read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
        else json.loads(text)
    sample = random.Random(0).sample(rows, ROWS)
    files = folder / f"{name}-train.json", folder / f"{name}-heldout.json"
    files[0].write_text(json.dumps(sample[held_out:]))
    files[1].write_text(json.dumps(sample[:held_out]))
    return files


def train_studio(data: Path, seed: int, batching: str, out: Path) -> Path:
    config = TrainConfig(data=str(data), output=str(out), targets=",".join(TARGETS), scheduler="linear", warmup=0,
                         seed=seed, batching=batching, **RECIPE)
    train(config, Callbacks(log=lambda text: None))
    return out / "adapter"


def train_peer(data: Path, seed: int, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    bf16 = choose_precision("auto", "cuda" if torch.cuda.is_available() else "cpu").name == "bf16"
    tokenizer = load_tokenizer("default")
    examples = prepare_dataset(str(data), tokenizer, seq_len=RECIPE["seq_len"], seed=seed).train
    torch.manual_seed(seed)  # the adapter's initialisation, as the Trainer's seed would give it
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RECIPE["rank"], lora_alpha=RECIPE["alpha"],
                                             lora_dropout=RECIPE["dropout"], target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    args = TrainingArguments(output_dir=str(out / "trainer"), num_train_epochs=RECIPE["epochs"],
                             per_device_train_batch_size=RECIPE["batch_size"], learning_rate=RECIPE["lr"],
                             lr_scheduler_type="linear", warmup_steps=0, seed=seed, bf16=bf16,
                             use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to=[],
                             logging_steps=1000, remove_unused_columns=False, disable_tqdm=True)
    columns = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    Trainer(model=model, args=args, train_dataset=columns, data_collator=pad).train()
    model.save_pretrained(out / "adapter")
    return out / "adapter"


def held_out_loss(adapter: Path, held_out: Path) -> float:
    """Mean cross-entropy per answer token of the held-out rows, with peft loading the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer("default")
    rows = prepare_dataset(str(held_out), tokenizer, seq_len=RECIPE["seq_len"], seed=0).train
    base = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="persona,alpaca", help=f"comma list of {', '.join(DATASETS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batching", default="grouped,random", help="the studio's batchings to score")
    p.add_argument("--dropout", type=float, default=RECIPE["dropout"], help="LoRA dropout, both recipes")
    args = p.parse_args()
    RECIPE["dropout"] = args.dropout
    seeds = [int(s) for s in args.seeds.split(",")]
    sides = [PEER, *args.batching.split(",")]
    print(f"recipe: {json.dumps(RECIPE)}, targets {','.join(TARGETS)}, linear schedule, no warmup; seeds {seeds}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            train_file, held_out = split(name, Path(tmp))
            scores: dict[str, list[float]] = {side: [] for side in sides}
            for seed in seeds:
                for side in sides:
                    started = time.perf_counter()
                    out = Path(tmp) / f"{name}-{side}-{seed}"
                    adapter = train_peer(train_file, seed, out) if side == PEER \
                        else train_studio(train_file, seed, side, out)
                    scores[side].append(held_out_loss(adapter, held_out))
                    print(f"  {name} seed {seed} {side:13} held-out loss {scores[side][-1]:.4f} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
            peer = statistics.mean(scores[PEER])
            print(f"\n{name}: held-out loss per answer token (lower is better)")
            for side, values in scores.items():
                mean = statistics.mean(values)
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                label = side if side == PEER else f"studio {side}"
                print(f"  {label:18} {' '.join(f'{v:.4f}' for v in values)}   mean {mean:.4f} ± {spread:.4f}   "
                      f"{mean / peer:.3f}x")
            print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training loop: one function, read top to bottom.

    train(config, callbacks) -> summary

Preflight (settings, output folder, model config, data) happens before the model loads, so a
mistake costs seconds, not a model load. The loop runs on ``accelerate`` (device placement, mixed
precision, data parallelism under ``accelerate launch`` / ``torchrun``); the optimizer sees only
adapter parameters. Compute goes only where it is useful: batches are grouped by length (or packed),
and the loss projects only labelled positions onto the vocabulary (see ``loss.py``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lora_app.lora import DeltaLoraUpdater, LoraConfig, add_adapter, count_parameters, load_adapter, param_groups, \
    save_adapter, set_trainable
from lora_app.training.batches import plan_batches, split_by_tokens
from lora_app.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lora_app.training.config import TrainConfig, TrainConfigError
from lora_app.training.loss import IGNORE_INDEX, linear_cross_entropy
from lora_app.training.memory import CPU_BATCH_TOKENS, estimate_memory, memory_now

ADAPTER = "default"
RUN_FILES = {"train.log", "config.json"}  # what the worker writes into a run folder before training starts


@dataclass
class Callbacks:
    """How a caller watches and steers a run (the CLI wires these to the run store)."""

    on_start: Callable[[dict], None] = lambda info: None      # total steps, estimate, ... once known
    on_log: Callable[[int, dict], None] = lambda step, values: None
    should_stop: Callable[[], bool] = lambda: False            # a graceful cancel: checkpoint, then stop
    log: Callable[[str], None] = print


@dataclass
class Outcome:
    status: str  # "completed" or "cancelled"
    summary: dict = field(default_factory=dict)


# ---- preflight ----------------------------------------------------------------------------------
def check_output(config: TrainConfig) -> Path:
    """An existing run folder is never overwritten: only --resume may continue in it."""
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise TrainingError(f"The output path {output} is a file; choose a folder.")
    existing = {p.name for p in output.iterdir()} - RUN_FILES if output.is_dir() else set()
    if config.resume:
        if latest_checkpoint(output) is None:
            raise TrainingError(f"Nothing to resume in {output}: it holds no checkpoint.")
    elif existing:
        raise TrainingError(f"The output folder {output} already holds a run ({', '.join(sorted(existing)[:4])}); "
                            "choose a new folder, or pass --resume to continue it.")
    return output


def check_model_limits(config: TrainConfig, model_config) -> None:
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit and config.seq_len > limit:
        raise TrainConfigError(f"Cannot start training:\n- sequence length {config.seq_len} is beyond the model's "
                               f"maximum of {limit} positions")


def resolve_precision(precision: str, device: torch.device) -> str:
    """accelerate's mixed-precision name. "auto": bf16 on a GPU that has it, fp16 on an older GPU,
    and on a CPU bf16 only with native bf16 matmul (AMX / AVX512-BF16) -- without it bf16 runs
    orders of magnitude slower than fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        capability = torch.backends.cpu.get_cpu_capability()
        return "bf16" if "AMX" in capability or "BF16" in capability else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


# ---- the model with its loss --------------------------------------------------------------------
_UNFUSABLE = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class CausalLMLoss(nn.Module):
    """``forward(batch) -> (sum of token losses, number of labelled tokens)``.

    Runs the transformer body for hidden states and projects only labelled positions through the
    output head (``linear_cross_entropy``); models that post-process their logits (soft-capping,
    logit scales) take the standard path with full logits. A module of its own so that
    ``accelerate`` wraps the whole computation (DDP needs the forward to go through its wrapper).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.fused = not any(getattr(cfg, key, None) for key in _UNFUSABLE) and model.get_output_embeddings() is not None

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if self.fused:
            hidden = self.model.base_model(**inputs)[0]
            head = self.model.get_output_embeddings()
            loss, count = linear_cross_entropy(hidden, head.weight, labels, head.bias)
        else:
            loss = self.model(**inputs, labels=labels).loss
            count = int((labels[:, 1:] != IGNORE_INDEX).sum())
        return loss * count, count


def _to_device(batch: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# ---- the run ------------------------------------------------------------------------------------
def train(config: TrainConfig, callbacks: Callbacks | None = None) -> Outcome:
    from accelerate import Accelerator
    from transformers import get_scheduler, set_seed

    from lora_app.data import collate, prepare_dataset
    from lora_app.models import load_config, load_model, load_tokenizer

    cb = callbacks or Callbacks()
    config.validate()
    output = check_output(config)
    model_config = load_config(config.model, config.trust_remote_code)
    check_model_limits(config, model_config)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    data = prepare_dataset(config.data, tokenizer, format=config.data_format, mapping=config.data_mapping,
                           template=config.template,
                           max_length=config.seq_len, train_on_prompt=config.train_on_prompt, packing=config.packing,
                           val_fraction=config.val_fraction, val_path=config.val_data, seed=config.seed)
    cb.log(f"data: {data.report.train_rows} training rows, {data.report.val_rows} validation rows "
           f"({data.report.format}, template {data.report.template}, {data.report.truncated} truncated)")

    # cpu=True without a GPU: torchrun / accelerate launch then give data parallelism over gloo
    accelerator = Accelerator(mixed_precision=resolve_precision(config.precision, _device()),
                              cpu=not torch.cuda.is_available())
    device = accelerator.device
    set_seed(config.seed)
    lora = LoraConfig(r=config.rank, alpha=config.alpha, dropout=config.dropout, targets=config.targets,
                      variant=config.variant, delta_lambda=config.delta_lambda,
                      base_model_name_or_path=str(config.model))
    estimate = estimate_memory(config, model_config, lora)
    cb.log(f"memory estimate: {estimate['total_bytes'] / 2**30:.2f} GiB")

    # -- model and adapter --
    quantization = None if config.quantization == "none" else config.quantization
    weights_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" and device.type == "cuda" else torch.float32
    model, _ = load_model(config.model, quantization, dtype=weights_dtype, device=str(device),
                          double_quant=config.double_quant, trust_remote_code=config.trust_remote_code)
    model.config.use_cache = False
    checkpoint = latest_checkpoint(output) if config.resume else None
    if checkpoint is not None:
        for param in model.parameters():
            param.requires_grad_(False)
        load_adapter(model, checkpoint / "adapter", ADAPTER)
        set_trainable(model, ADAPTER)
    else:
        add_adapter(model, lora, ADAPTER)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)

    optimizer = torch.optim.AdamW(param_groups(model, ADAPTER, config.lr, config.lora_plus_ratio, config.weight_decay),
                                  lr=config.lr)
    delta = DeltaLoraUpdater(model, ADAPTER, optimizer) if config.variant == "delta-lora" else None

    # -- schedule --
    shard = (accelerator.process_index, accelerator.num_processes)
    group = not config.packing
    batches_per_epoch = len(plan_batches(data.lengths if group else [0] * len(data.train),
                                         config.batch_size, config.seed, 0, group, shard))
    if batches_per_epoch == 0:
        raise TrainingError("There are fewer training examples than processes; nothing to train on.")
    steps_per_epoch = max(1, batches_per_epoch // config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = int(config.warmup) if config.warmup >= 1 else round(config.warmup * total_steps)
    scheduler = get_scheduler(config.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    lengths = [len(example["input_ids"]) for example in data.train]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    token_budget = config.max_batch_tokens if config.max_batch_tokens is not None else \
        (CPU_BATCH_TOKENS if device.type == "cpu" else 0)

    @functools.lru_cache(maxsize=2)  # a step's micro-batches share (at most two) epoch plans
    def epoch_plan(epoch: int) -> list[list[int]]:
        return plan_batches(lengths, config.batch_size, config.seed, epoch, group, shard)

    def step_batches(step: int) -> list[dict]:
        """The collated micro-batches of one optimizer step: its ``grad_accum`` batches, re-cut so
        that no micro-batch exceeds the token budget (the step's gradient is the same either way)."""
        indices = []
        for index in range(step * config.grad_accum, (step + 1) * config.grad_accum):
            epoch, position = divmod(index, batches_per_epoch)
            indices += epoch_plan(epoch)[position]
        return [collate([data.train[i] for i in chunk], pad_id)
                for chunk in split_by_tokens(indices, lengths, config.batch_size, token_budget)]

    loss_model = CausalLMLoss(model)
    # The scheduler stays unprepared: accelerate would step it once per process, but our step count
    # is already per process (each process sees its shard of the batches).
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)

    start_step, train_tokens, elapsed_before = 0, 0, 0.0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, optimizer, scheduler)
        start_step, train_tokens, elapsed_before = state["step"], state["train_tokens"], state["wall_seconds"]
        cb.log(f"resumed from {checkpoint.name} at step {start_step}")

    main = accelerator.is_main_process  # with several processes, one writes the files
    if main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    info = dict(total_steps=total_steps, trainable_params=trainable, total_params=total, estimate=estimate,
                start_step=start_step, train_rows=data.report.train_rows, val_rows=data.report.val_rows)
    cb.on_start(info)
    cb.log(f"training {trainable:,} of {total:,} parameters for {total_steps} steps "
           f"({accelerator.mixed_precision} precision, {device})")

    def evaluate() -> float | None:
        if not data.val:
            return None
        loss_model.eval()
        total_loss, count = 0.0, 0
        with torch.no_grad(), accelerator.autocast():
            for start in range(0, len(data.val), config.batch_size):
                batch = _to_device(collate(data.val[start:start + config.batch_size], pad_id), device)
                loss_sum, n = loss_model(**batch)
                total_loss, count = total_loss + float(loss_sum), count + n
        loss_model.train()
        return total_loss / max(count, 1)

    def checkpoint_now(step: int, wall: float) -> None:
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(output / "checkpoints" / f"checkpoint-{step}", model, ADAPTER, optimizer, scheduler,
                            dict(step=step, train_tokens=train_tokens, wall_seconds=wall))

    # -- the loop --
    loss_model.train()
    started, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    step, status, eval_loss, last_loss = start_step, "completed", None, None
    while step < total_steps:
        batches = step_batches(step)
        step_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        step_loss = 0.0
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with (nullcontext() if sync else accelerator.no_sync(loss_model)), accelerator.autocast():
                loss_sum, _ = loss_model(**_to_device(batch, device))
                loss = loss_sum / max(step_tokens, 1)
            accelerator.backward(loss)
            step_loss += float(loss.detach())
        if not math.isfinite(step_loss):
            raise TrainingError(f"The loss became {step_loss} at step {step + 1}: training diverged. Lower the "
                                "learning rate, use fp32/bf16 rather than fp16, or check the data.")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm) \
            if config.max_grad_norm > 0 else _grad_norm(model)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_tokens += step_tokens
        window_tokens += step_tokens
        last_loss = step_loss

        now = time.perf_counter()
        wall = elapsed_before + now - started
        stop = cb.should_stop()
        if accelerator.num_processes > 1:  # a cancel reaches the main process; every process must stop
            stop = bool(accelerator.reduce(torch.tensor([float(stop)], device=device), "sum").item())
        evaluated = bool(config.eval_every and step % config.eval_every == 0 and step < total_steps)
        if evaluated:  # the last step is evaluated after the loop, once
            eval_loss = evaluate()
        if step % config.log_every == 0 or step == total_steps or stop:
            done = step - start_step
            values = dict(loss=step_loss, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                          tokens_per_second=window_tokens / max(now - window_start, 1e-9), elapsed=wall,
                          eta=(now - started) / done * (total_steps - step), epoch=step / steps_per_epoch,
                          **memory_now(device))
            if evaluated and eval_loss is not None:
                values["eval_loss"] = eval_loss
            cb.on_log(step, values)
            window_tokens, window_start = 0, now
        if config.save_every and step % config.save_every == 0 and step < total_steps:
            checkpoint_now(step, wall)
        if stop and step < total_steps:
            checkpoint_now(step, wall)
            status = "cancelled"
            cb.log(f"cancelled: checkpoint saved at step {step}; resume to continue")
            break

    wall = elapsed_before + time.perf_counter() - started
    if status == "completed":
        eval_loss = evaluate()
        if eval_loss is not None:
            cb.on_log(step, dict(eval_loss=eval_loss))
        if delta is not None:
            delta.remove()
        accelerator.wait_for_everyone()
        if main:
            save_adapter(model, ADAPTER, output / "adapter")
    peak = memory_now(device)
    summary = dict(status=status, final_loss=last_loss, eval_loss=eval_loss, steps=step, total_steps=total_steps,
                   train_tokens=train_tokens, useful_tokens_per_second=train_tokens / max(wall, 1e-9),
                   peak_memory_bytes=peak.get("cuda_peak_bytes", peak["peak_rss_bytes"]),
                   peak_rss_bytes=peak["peak_rss_bytes"], trainable_params=trainable, total_params=total,
                   wall_seconds=wall, memory_estimate_bytes=estimate["total_bytes"], memory_estimate=estimate,
                   precision=accelerator.mixed_precision, device=str(device))
    if main:
        _write_json(output / "summary.json", summary)
    return Outcome(status, summary)


def _grad_norm(model: nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _device() -> torch.device:
    local = os.environ.get("LOCAL_RANK")
    if torch.cuda.is_available():
        return torch.device("cuda", int(local or 0))
    return torch.device("cpu")


def _write_json(path: Path, values: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2, default=str))
    os.replace(tmp, path)

"""The training recipe, in phases read top to bottom:

    train(config, callbacks) -> Outcome
        preflight          settings, output folder, model config: a mistake costs seconds, not a model load
        Recipe.__init__    _setup_data, accelerate, _setup_model (load, quantize, attach or resume the
                           adapter), _setup_plan (batches), _setup_optimizer (AdamW, LoRA+, schedule)
        Recipe.run         _setup_lanes (a CPU's micro-batches side by side), _start, then per step
                           _loss_step and _after_step (metrics, eval, checkpoint, cancel), then _finish
                           (final eval, adapter, summary)

The loop runs on ``accelerate`` (device placement, mixed precision, data parallelism under
``accelerate launch`` / ``torchrun``); the optimizer sees only adapter parameters. Compute goes only
where it is useful: batches are grouped by length (or packed), and the loss projects only labelled
positions onto the vocabulary (see ``loss.py``).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import LambdaLR
from transformers import GenerationConfig, PretrainedConfig

from lora_app import allocator
from lora_app.data import PreparedData, PromptFormat, collate, prepare_dataset
from lora_app.data.errors import RowSkip
from lora_app.errors import DataError, ModelLoadError, OutOfMemory, TrainConfigError, TrainingError
from lora_app.hardware import Precision, attention_kernels, choose_precision
from lora_app.lora import DeltaLoraUpdater, add_adapter, count_parameters, group_shared_inputs, load_adapter, \
    param_groups, save_adapter, set_trainable
from lora_app.lora.functional import new_seed, seed_stream
from lora_app.model_source import base_model_id
from lora_app.models import default_device, eos_token_ids, load_config, load_model, load_tokenizer
from lora_app.paths import write_json
from lora_app.training.batches import StepPlan
from lora_app.training.checkpoint import load_checkpoint, save_checkpoint
from lora_app.training.config import TrainConfig
from lora_app.training.fused import fuse
from lora_app.training.lanes import Lanes, assign, lane_count, lane_share
from lora_app.training.loss import IGNORE_INDEX, linear_cross_entropy
from lora_app.training.probes import input_texts, probes_for, token_f1
from lora_app.training.schedule import multiplier
from lora_app.training.memory import estimate_memory, memory_now, token_budget
from lora_app.training.preflight import (DATA_CHECK_ROWS, DATA_SETTINGS, check_output, finished_steps,
                                         latest_checkpoint, quick_problems)

ADAPTER = "default"
SPEED_WINDOW = 10  # steps the live tokens/s and ETA are measured over (evaluation and saving not counted)
SAFE_MARGIN = 512 * 2**20  # memory a CPU run leaves free: below it the kernel's OOM killer may end the run
FAULT_ENV = "LORA_APP_INJECT_OOM"  # steps (1-based, comma-separated) that raise an out-of-memory error once


# On a CPU computing in bf16, oneDNN keeps a compiled product, with memory of its own, for every shape it
# has met, and a micro-batch of a new length is a new shape in every layer: a run's memory grew with
# each. Widths padded to a multiple of 16 keep the shapes few (16 widths per batch size at seq 256).
# Measured on jemalloc (see lora_app.allocator; 2-core EPYC with AVX512-BF16, default model, alpaca
# demo data, batch 4, seq 256, 60 steps): peak RSS 1.69 GiB unpadded, 1.34 GiB padded to 16 and 1.27
# to 32, at 315, 337 and 302 useful tokens/s; the estimate was 1.11 GiB.
CPU_BF16_WIDTH_MULTIPLE = 16


def width_multiple(device_type: str, precision: Precision) -> int:
    """What a micro-batch's width is rounded up to a multiple of, on this device in this precision."""
    return CPU_BF16_WIDTH_MULTIPLE if device_type == "cpu" and precision.name == "bf16" else 1


class MemoryShortage(Exception):
    """A micro-batch would leave less than SAFE_MARGIN of the machine's memory free."""


@dataclass
class Callbacks:
    """How a caller watches and steers a run (the CLI wires these to the run store)."""

    on_start: Callable[[dict], None] = lambda info: None      # total steps, estimate, ... once known
    on_log: Callable[[int, dict], None] = lambda step, values: None
    should_stop: Callable[[], bool] = lambda: False            # a graceful cancel: checkpoint, then stop
    log: Callable[[str], None] = print
    on_phase: Callable[[str, str], None] = lambda phase, detail: None  # store.PHASES, and what it found
    on_probes: Callable[[int, list[dict]], None] = lambda step, answers: None  # the probe answers at a step
    on_event: Callable[[int, str], None] = lambda step, text: None  # something the run changed by itself


@dataclass
class Outcome:
    status: str  # "completed" or "cancelled"
    summary: dict = field(default_factory=dict)


# ---- preflight ----------------------------------------------------------------------------------
@dataclass
class Checked:
    """What preflight found: the run folder and the model's config."""

    output: Path
    model_config: PretrainedConfig


def preflight(config: TrainConfig) -> Checked:
    """Every check that needs no weights: ``quick_problems``, then the model's config and limits and
    the data's first rows through its tokenizer, then the output folder. Raises a ``UserError``
    subclass; settings problems come all at once."""
    problems = quick_problems(config)
    model_config = None
    if "model" not in problems:
        try:
            model_config = load_config(config.model, config.trust_remote_code)
        except ModelLoadError as err:
            if not problems:
                raise
            problems["model"] = str(err)
    limit = model_config and (getattr(model_config, "max_position_embeddings", None)
                              or getattr(model_config, "n_positions", None))
    if limit and "seq_len" not in problems and config.seq_len > limit:
        problems["seq_len"] = f"sequence length {config.seq_len} is beyond the model's maximum of {limit} positions"
    if model_config is not None and not problems.keys() & DATA_SETTINGS:
        try:
            _check_data(config)
        except (DataError, ModelLoadError) as err:
            problems["data"] = str(err)
    if problems:
        raise TrainConfigError(problems)
    return Checked(check_output(config), model_config)


def _check_data(config: TrainConfig) -> None:
    """Tokenize the first rows as the run will: a row too long, a template that does not fit, ... are
    found before any weights load (the run reads them all, and reports rows it had to skip)."""
    prepare(config, load_tokenizer(config.model, config.trust_remote_code), limit=DATA_CHECK_ROWS)


def prepare(c: TrainConfig, tokenizer, limit: int | None = None) -> PreparedData:
    """The run's data as its settings say (the first ``limit`` rows only, for a check)."""
    return prepare_dataset(c.data, tokenizer, format=c.data_format, mapping=c.data_mapping, template=c.template,
                           seq_len=c.seq_len, train_on_prompt=c.train_on_prompt, system=c.system(),
                           packing=c.batching == "packed", val_fraction=c.val_fraction, val_data=c.val_data,
                           seed=c.seed, limit=limit)


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
def train(config: TrainConfig, callbacks: Callbacks | None = None, checked: Checked | None = None) -> Outcome:
    """Train one adapter as ``config`` says. ``checked``: a preflight the caller already ran."""
    return Recipe(config, callbacks or Callbacks(), checked or preflight(config)).run()


class Recipe:
    """One run: set up in phases by the constructor, trained by ``run()``."""

    def __init__(self, config: TrainConfig, callbacks: Callbacks, checked: Checked):
        self.config, self.cb, self.output = config, callbacks, checked.output
        self.precision = choose_precision(config.precision, torch.device(default_device()).type)
        self.cb.log(f"run: model {base_model_id(config.model)} · data {Path(config.data).name} · {config.variant} "
                    f"r={config.rank} α={config.alpha:g} · {self.precision.name} on {default_device()} "
                    f"({self.precision.reason}) · folder {self.output} · memory from {allocator.in_use()}")
        self._setup_data()
        # accelerate keeps one precision per process; a second run in the same process (a benchmark, the
        # tests) may want another. The distributed state (PartialState) is kept.
        AcceleratorState._reset_state()
        # cpu=True without a GPU: torchrun / accelerate launch then give data parallelism over gloo
        self.accelerator = Accelerator(mixed_precision=self.precision.accelerate, cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.main = self.accelerator.is_main_process  # with several processes, one writes the files
        set_seed(config.seed)
        self.lane_count = lane_count(self.device.type, self.precision, config.gradient_checkpointing, config.cpu_lanes,
                                     self.accelerator.num_processes)
        self._setup_plan()
        self.estimate = estimate_memory(config, checked.model_config, self.device.type, self.precision,
                                        tokens=self.plan.largest_micro_batch(), lanes=self.lane_count)
        self.cb.log(f"memory estimate: {self.estimate['total_bytes'] / 2**30:.2f} GiB")
        self.bytes_per_token = self.estimate["activations_bytes"] / max(self.plan.largest_micro_batch() * self.lane_count, 1)
        self.faulted: set[int] = set()  # steps whose injected fault was raised
        self.cb.on_phase("loading model", base_model_id(config.model))
        self._setup_model()
        self._setup_optimizer()
        self.lanes = None
        # The scheduler stays unprepared: accelerate would step it once per process, but our step count
        # is already per process (each process sees its shard of the batches).
        self.loss_model, self.optimizer = self.accelerator.prepare(CausalLMLoss(self.model), self.optimizer)
        self.step, self.train_tokens, self.elapsed_before = 0, 0, 0.0
        self.last_loss = self.eval_loss = None
        if self.checkpoint is not None:
            state = load_checkpoint(self.checkpoint, self.optimizer, self.scheduler)
            self.step, self.train_tokens, self.elapsed_before = state["step"], state["train_tokens"], state["wall_seconds"]
            self.cb.log(f"resumed from {self.checkpoint.name} at step {self.step}")
            if state.get("micro_size", self.plan.micro_size) < self.plan.micro_size:  # memory ran out before
                self.plan.micro_size, self.plan.token_budget = state["micro_size"], state["token_budget"]
                self.cb.log(f"micro-batches of {self.plan.micro_size} examples, as the run cut them when memory "
                            "ran out")

    # -- setup ----------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        c = self.config
        self.cb.on_phase("preparing data", Path(c.data).name)
        self.tokenizer = load_tokenizer(c.model, c.trust_remote_code)
        self.data = prepare(c, self.tokenizer)
        tokens = sum(len(example["input_ids"]) for example in self.data.train)
        self.cb.on_phase("preparing data", f"{self.data.report.train_rows:,} rows, {tokens:,} tokens")
        template = self.data.template
        # chat renders prompts as training did; raw text has no prompt to render
        self.prompt_format = PromptFormat(template.name, template.source, c.system()) if template.source else None
        r = self.data.report
        self.cb.log(f"data: {r.train_rows} training rows, {r.val_rows} validation rows "
                    f"({r.format}, template {r.template}, {r.truncated} truncated)")
        for line in r.skipped_lines():  # rows left out (a broken line, a missing field): say which, where
            self.cb.log(f"skipped {line}")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self._setup_probes()

    def _setup_probes(self) -> None:
        """The probe prompts as token ids, rendered as training renders a prompt."""
        c = self.config
        self.probes, self.probe_ids, self.probe_seconds, self.probe_rounds = [], [], 0.0, []
        for probe in probes_for(c.probe_prompts, c.probe_rows, self.data.val_samples):
            try:
                texts = input_texts(probe, self.tokenizer, self.data.template, c.system())
            except RowSkip as skip:
                self.cb.log(f"probe {probe.prompt[:40]!r} left out: {skip}")
                continue
            ids = [i for text in texts for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            self.probes.append(probe)
            self.probe_ids.append(ids[-c.seq_len:])
        if c.probe_rows and sum(p.reference is not None for p in self.probes) < c.probe_rows:
            self.cb.log(f"probes: only {sum(p.reference is not None for p in self.probes)} of the {c.probe_rows} "
                        "validation rows asked for have a question and an answer")

    def _setup_model(self) -> None:
        """The base model (quantized if asked), with a new adapter or the one being resumed."""
        c = self.config
        quantization = None if c.quantization == "none" else c.quantization
        # bf16 runs keep the frozen base in bf16 (half the memory, native matmuls); adapters and their
        # optimizer state stay fp32
        weights = torch.bfloat16 if self.precision.name == "bf16" else torch.float32
        self.model, _ = load_model(c.model, quantization, dtype=weights,
                                   device=str(self.device), double_quant=c.double_quant,
                                   trust_remote_code=c.trust_remote_code)
        self.model.config.use_cache = False
        fused = fuse(self.model)
        self.cb.log(f"fused for training: {fused['rms_norm']} RMS norms, {fused['gated_mlp']} gated MLPs"
                    + (f", {fused['linear_4bit']} 4-bit projections" if fused["linear_4bit"] else ""))
        self.checkpoint = latest_checkpoint(self.output) if c.resume else None
        if self.checkpoint is not None:
            load_adapter(self.model, self.checkpoint / "adapter", ADAPTER)
            set_trainable(self.model, ADAPTER)
        else:
            add_adapter(self.model, c.lora_config(), ADAPTER)
        groups = group_shared_inputs(self.model)
        if groups:
            self.cb.log(f"grouped for training: {groups} sets of adapters that read one input (q, k, v; gate, up)")
        if c.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.trainable, self.total = count_parameters(self.model)

    def _setup_plan(self) -> None:
        c = self.config
        shard = (self.accelerator.process_index, self.accelerator.num_processes)
        micro_size, budget = lane_share(c.batch_size, token_budget(c, self.device.type), self.lane_count)
        self.plan = StepPlan([len(example["input_ids"]) for example in self.data.train], c.batch_size, c.grad_accum,
                             c.seed, grouped=c.batching == "grouped", shard=shard, token_budget=budget,
                             width_multiple=width_multiple(self.device.type, self.precision), limit=c.seq_len)
        self.plan.micro_size = micro_size
        if self.plan.batches_per_epoch == 0:
            raise TrainingError("There are fewer training examples than processes; nothing to train on.")
        self.total_steps = c.max_steps or max(1, math.ceil(c.epochs * self.plan.steps_per_epoch))

    def _setup_optimizer(self) -> None:
        c = self.config
        # on a GPU one fused kernel updates every adapter tensor (a step there is bound by kernel launches)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, ADAPTER, c.lr, c.lora_plus_ratio, c.weight_decay),
                                           lr=c.lr, fused=self.device.type == "cuda" or None)
        # The gradients live for the whole run, allocated before the first activation and zeroed, not
        # freed, after each step: on a CPU, ~100 small tensors allocated anew in every backward pass land
        # among the freed activations, and glibc's heap grows around them (peak RSS 2.26 -> 2.11-2.19 GiB
        # on bench_train's run, 2.54 -> 2.35 GiB on raw text in 512-token micro-batches, same speed)
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        self.delta = DeltaLoraUpdater(self.model, ADAPTER, self.optimizer) if c.variant == "delta-lora" else None
        self.params = [param for group in self.optimizer.param_groups for param in group["params"]]
        warmup = int(c.warmup) if c.warmup >= 1 else round(c.warmup * self.total_steps)
        self.scheduler = LambdaLR(self.optimizer, functools.partial(multiplier, c.scheduler, warmup=warmup,
                                                                    total=self.total_steps))

    def _setup_lanes(self) -> None:
        """The lanes' threads, and the gradient buffers of every lane but the first (see ``lanes.py``)."""
        if self.lane_count > 1:
            self.lanes = Lanes(self.lane_count)
            self.lane_grads = [[torch.zeros_like(param) for param in self.params] for _ in range(self.lane_count - 1)]
            each = self.lanes.threads_each
            self.cb.log(f"lanes: {self.lane_count} micro-batches train at a time, on {each} core{'s' if each > 1 else ''} "
                        "each")

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Outcome:
        self._setup_lanes()
        try:
            return self._run()
        finally:
            if self.lanes is not None:
                self.lanes.close()

    def _run(self) -> Outcome:
        self._start()
        status = "completed"
        self.loss_model.train()
        self.started = time.perf_counter()
        self.first_step = self.step
        # (seconds, tokens) of the last steps, for the live speed and ETA; the first step warms up
        # (memory, kernels) and would understate both, so it only counts until another is done
        self.recent = deque(maxlen=SPEED_WINDOW)
        if self.step == 0:
            self._probe()  # the adapter is still zero: the base model's answers
        self.cb.on_phase("first step", "")
        while self.step < self.total_steps:
            began = time.perf_counter()
            loss, grad_norm, tokens = self._loss_step()
            if self.step == self.first_step + 2:
                self.recent.clear()
            self.recent.append((time.perf_counter() - began, tokens))
            if self.step == self.first_step + 1:
                self.cb.on_phase("training", "")
            if self._after_step(loss, grad_norm):
                status = "cancelled"
                break
        return self._finish(status)

    def _start(self) -> None:
        if self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            finished = self.output / "adapter"
            if finished.exists():  # a finished run trained further: its adapter is kept, under its step
                kept = self.output / "checkpoints" / f"adapter-step{finished_steps(self.output) or self.step}"
                kept.parent.mkdir(exist_ok=True)
                finished.rename(kept)
                self.cb.log(f"the adapter of the finished run is kept in {kept}")
            self.config.write(self.output / "config.json")
        self.cb.on_start(dict(total_steps=self.total_steps, trainable_params=self.trainable, total_params=self.total,
                              estimate=self.estimate, start_step=self.step, train_rows=self.data.report.train_rows,
                              val_rows=self.data.report.val_rows))
        self.cb.log(f"training {self.trainable:,} of {self.total:,} parameters for {self.total_steps} steps "
                    f"({self.precision.name}, {self.device})")

    def _loss_step(self) -> tuple[float, torch.Tensor | float, int]:
        """One optimizer step: ``_gradients``, then the update. A step whose micro-batches do not fit
        in memory is computed again in micro-batches half as large (the same examples, so the same
        update: more accumulation, not a smaller batch), down to one example each."""
        while True:
            try:
                step_loss, tokens = self._gradients()
                break
            except (torch.OutOfMemoryError, MemoryShortage) as err:
                self.optimizer.zero_grad(set_to_none=False)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.accelerator.num_processes > 1:  # the other processes already wait for this one
                    raise
                shrunk = self.plan.shrink(self.step)
                if shrunk is None:
                    raise OutOfMemory(self.step + 1, str(err)) from err
                self.cb.on_event(self.step + 1, f"out of memory ({err}): micro-batches of {shrunk[0]} examples cut "
                                                f"to {shrunk[1]}, the same examples per step")
        if not math.isfinite(step_loss):
            raise TrainingError(f"The loss became {step_loss} at step {self.step + 1}: training diverged. Lower the "
                                "learning rate, use fp32/bf16 rather than fp16, or check the data.")
        max_norm = self.config.max_grad_norm
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm) if max_norm > 0 \
            else _grad_norm(self.model)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.step += 1
        self.train_tokens += tokens
        return step_loss, grad_norm, tokens

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """``rows`` as one padded batch, as wide as the plan pads."""
        return collate(rows, self.pad_id, self.plan.padded_width([len(row["input_ids"]) for row in rows]))

    def _gradients(self) -> tuple[float, int]:
        """The step's gradients, summed over its micro-batches: (the loss, the mean over the step's
        labelled tokens; the labelled tokens)."""
        batches = [self._collate([self.data.train[i] for i in chunk]) for chunk in self.plan.micro_batches(self.step)]
        tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        if self.lanes is not None and len(batches) > 1:
            return self._lane_gradients(batches, tokens), tokens
        step_loss = 0.0
        for i, batch in enumerate(batches):
            self._make_room(batch["input_ids"].numel(), first=i == 0)
            sync = i == len(batches) - 1  # under DDP, gradients are averaged once per step
            with nullcontext() if sync else self.accelerator.no_sync(self.loss_model):
                loss = self._loss(batch, tokens)
            self.accelerator.backward(loss)
            step_loss += float(loss.detach())
        return step_loss, tokens

    def _loss(self, batch: dict, tokens: int) -> torch.Tensor:
        """The micro-batch's share of the step's loss (its summed token losses over the step's ``tokens``)."""
        with self.accelerator.autocast(), attention_kernels(self.device.type):
            loss_sum, _ = self.loss_model(**_to_device(batch, self.device))
            return loss_sum / max(tokens, 1)

    def _lane_gradients(self, batches: list[dict], tokens: int) -> float:
        """``_gradients`` with the micro-batches trained in lanes: each lane adds its gradients into its
        own buffers (the first lane into the parameters' own), then the buffers are added in lane order.
        Each micro-batch's dropout masks come from a seed drawn here, in order."""
        chosen = assign([batch["input_ids"].numel() for batch in batches], self.lanes.count)
        self._make_room(sum(batches[indices[0]]["input_ids"].numel() for indices in chosen if indices), first=True)
        seeds = [new_seed() for _ in batches]
        buffers = [[param.grad for param in self.params], *self.lane_grads]
        for lane in self.lane_grads:
            for buffer in lane:
                buffer.zero_()

        def train(indices: list[int], grads: list[torch.Tensor]) -> float:
            lane_loss = 0.0
            for i in indices:
                with seed_stream(seeds[i]):
                    loss = self._loss(batches[i], tokens)
                for grad, new in zip(grads, torch.autograd.grad(loss, self.params, allow_unused=True)):
                    if new is not None:
                        grad += new
                lane_loss += float(loss.detach())
            return lane_loss

        losses = self.lanes.run([functools.partial(train, indices, grads) if indices else None
                                 for indices, grads in zip(chosen, buffers)])
        for lane in self.lane_grads:
            for param, buffer in zip(self.params, lane):
                param.grad += buffer
        return sum(loss for loss in losses if loss is not None)

    def _make_room(self, tokens: int, first: bool) -> None:
        """Raise an out-of-memory error before a micro-batch that would not fit: on a CPU, when its
        activations would leave less than ``SAFE_MARGIN`` of the machine's memory free (the kernel
        would kill the process, with no error to recover from); and where ``FAULT_ENV`` injects one."""
        if first and str(self.step + 1) in os.environ.get(FAULT_ENV, "").split(",") and self.step not in self.faulted:
            self.faulted.add(self.step)
            raise torch.OutOfMemoryError(f"injected by {FAULT_ENV}")
        if self.device.type == "cpu":
            need, free = tokens * self.bytes_per_token, psutil.virtual_memory().available
            if free - need < SAFE_MARGIN:
                raise MemoryShortage(f"{need / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free")

    def _after_step(self, loss: float, grad_norm) -> bool:
        """Metrics, evaluation, checkpoints and a cancel after each step; True when the run must stop."""
        c, step, last = self.config, self.step, self.step == self.total_steps
        self.last_loss = loss
        now = time.perf_counter()
        wall = self.elapsed_before + now - self.started
        stop = self.cb.should_stop()
        if self.accelerator.num_processes > 1:  # a cancel reaches the main process; every process must stop
            stop = bool(self.accelerator.reduce(torch.tensor([float(stop)], device=self.device), "sum").item())
        # the last step is evaluated in _finish, once
        evaluate = bool(c.eval_every) and step % c.eval_every == 0 and not last
        eval_loss = self._evaluate() if evaluate else None
        self.eval_loss = eval_loss if eval_loss is not None else self.eval_loss
        if step % c.log_every == 0 or last or stop:
            seconds, tokens = (sum(values) for values in zip(*self.recent))
            values = dict(loss=loss, lr=self.scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                          tokens=self.train_tokens, tokens_per_second=tokens / max(seconds, 1e-9), elapsed=wall,
                          eta=self._eta(),
                          epoch=step / self.plan.steps_per_epoch, **memory_now(self.device))
            if eval_loss is not None:
                values["eval_loss"] = eval_loss
            self.cb.on_log(step, values)
        cancel = stop and not last
        # with checkpoints asked for, the last step has one too: a finished run can be trained further
        checkpoint = cancel or (c.save_every and (step % c.save_every == 0 or last))
        if checkpoint:
            self._checkpoint(wall)
        if (evaluate or checkpoint) and not last and self.probes:
            self._probe_within_budget(wall)
        if cancel:
            self.cb.log(f"cancelled: checkpoint saved at step {step}; resume to continue")
        elif (eval_loss is not None or checkpoint or (evaluate and self.probes)) and not last:
            self.cb.on_phase("training", "")
        return cancel

    def _evaluate(self) -> float | None:
        """Mean loss per labelled token over the validation set; None without one."""
        if not self.data.val:
            return None
        self.cb.on_phase("evaluating", f"{len(self.data.val)} validation rows")
        self.loss_model.eval()
        total, count, size = 0.0, 0, self.config.batch_size
        with torch.no_grad(), self.accelerator.autocast(), attention_kernels(self.device.type):
            for start in range(0, len(self.data.val), size):
                batch = _to_device(self._collate(self.data.val[start:start + size]), self.device)
                loss_sum, n = self.loss_model(**batch)
                total, count = total + float(loss_sum), count + n
        self.loss_model.train()
        return total / max(count, 1)

    def _eta(self) -> float:
        """Seconds of training left, at the pace of the last steps."""
        return sum(seconds for seconds, _ in self.recent) / len(self.recent) * (self.total_steps - self.step)

    def _probe_within_budget(self, wall: float) -> None:
        """A round of probe answers, unless it would take probing over ``probe_budget`` of the run's
        expected time (the time so far and the ETA): then it is skipped, and the log says so."""
        budget, cost = self.config.probe_budget, self.probe_rounds[-1] if self.probe_rounds else 0.0
        expected = wall + self._eta()
        if budget and self.probe_seconds + cost > budget * expected:
            self.cb.log(f"probes at step {self.step} skipped: a round takes {cost:.1f} s and probing has taken "
                        f"{self.probe_seconds:.0f} s of the {budget:.0%} budget of this run's ~{expected:.0f} s "
                        "(raise the probe time budget, or probe less often)")
            return
        self._probe()

    def _probe(self) -> None:
        """Greedy answers to the probe prompts with the adapter as it is now, scored where a reference
        exists, to the callbacks (``on_probes``); their time goes to ``probe_seconds``. The prompts go
        as one left-padded batch: a small model generates several answers in the time of one."""
        if not self.probes or not self.main:
            return
        self.cb.on_phase("probing", f"{len(self.probes)} prompts at step {self.step}")
        began = time.perf_counter()
        width = max(map(len, self.probe_ids))
        ids = torch.tensor([[self.pad_id] * (width - len(i)) + i for i in self.probe_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in self.probe_ids], device=self.device)
        settings = GenerationConfig(max_new_tokens=self.config.probe_tokens, do_sample=False, use_cache=True,
                                    eos_token_id=eos_token_ids(self.model, self.tokenizer), pad_token_id=self.pad_id)
        self.loss_model.eval()
        with torch.no_grad(), self.accelerator.autocast(), attention_kernels(self.device.type):
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
        self.loss_model.train()
        seconds = time.perf_counter() - began
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        answers = [dict(probe=i, prompt=probe.prompt, reference=probe.reference, answer=text.strip(),
                        score=None if probe.reference is None else token_f1(text, probe.reference),
                        seconds=seconds / len(self.probes))
                   for i, (probe, text) in enumerate(zip(self.probes, texts))]
        self.probe_seconds += seconds
        self.probe_rounds.append(seconds)
        self.cb.on_probes(self.step, answers)

    def _checkpoint(self, wall: float) -> None:
        self.cb.on_phase("saving", f"checkpoint at step {self.step}")
        self.accelerator.wait_for_everyone()
        if self.main:
            save_checkpoint(self.output / "checkpoints" / f"checkpoint-{self.step}", self.model, ADAPTER,
                            self.optimizer, self.scheduler,
                            dict(step=self.step, train_tokens=self.train_tokens, wall_seconds=wall,
                                 micro_size=self.plan.micro_size, token_budget=self.plan.token_budget),
                            self.prompt_format)

    def _finish(self, status: str) -> Outcome:
        """Final evaluation and adapter (when completed), and the summary."""
        wall = self.elapsed_before + time.perf_counter() - self.started
        if status == "completed":
            self.eval_loss = self._evaluate()
            if self.eval_loss is not None:
                self.cb.on_log(self.step, dict(eval_loss=self.eval_loss))
            self._probe()
            if self.delta is not None:
                self.delta.remove()
            self.cb.on_phase("saving", "the adapter")
            self.accelerator.wait_for_everyone()
            if self.main:
                save_adapter(self.model, ADAPTER, self.output / "adapter")
                if self.prompt_format is not None:
                    self.prompt_format.save(self.output / "adapter")
        peak = memory_now(self.device)
        summary = dict(status=status, final_loss=self.last_loss, eval_loss=self.eval_loss,
                       steps=self.step, total_steps=self.total_steps, train_tokens=self.train_tokens,
                       useful_tokens_per_second=self.train_tokens / max(wall, 1e-9),
                       peak_memory_bytes=peak.get("cuda_peak_bytes", peak["peak_rss_bytes"]),
                       peak_rss_bytes=peak["peak_rss_bytes"], trainable_params=self.trainable,
                       total_params=self.total, wall_seconds=wall, memory_estimate_bytes=self.estimate["total_bytes"],
                       memory_estimate=self.estimate, precision=self.precision.name,
                       precision_reason=self.precision.reason, device=str(self.device),
                       probe_seconds=self.probe_seconds, micro_batch=self.plan.micro_size)
        if self.main:
            write_json(self.output / "summary.json", summary)
        return Outcome(status, summary)


def _grad_norm(model: nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0

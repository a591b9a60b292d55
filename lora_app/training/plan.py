"""`lora-app plan`: will a run fit, and how long will it take -- measured on the user's own data.

The formula estimate (``memory.estimate_memory``) is the instant first guess. A plan replaces it with a
measurement: a fresh process trains ``PLAN_STEPS`` real steps of the run as configured -- its longest
step first (the one that sets the peak), then the next longest, a median and the shortest -- and
records the peak memory (process RSS on a CPU, the CUDA allocator's peak on a GPU), the time of each
step after the first (which warms up), and the seconds it took to get to the first step. From these:

    peak          the measured peak: the longest step has run, with the optimizer's state allocated
    training time a line through the timed steps (a fixed cost per step plus a cost per padded token)
                  over every step of the run, plus the evaluations (a forward pass costs about a third
                  of a training step's)
    alternatives  the measured peak and time moved by what the formula says each change does (a
                  smaller micro-batch, gradient checkpointing, 4-bit, a lower rank, a shorter sequence)

The plan is written as JSON (``--out``; the studio keeps it in the run folder, where the memory chart
draws it beside what the run then uses).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil
import torch
from transformers.utils import logging as hf_logging

from lora_app.errors import UserError
from lora_app.hardware import choose_precision
from lora_app.paths import write_json
from lora_app.training import cli
from lora_app.training.config import TrainConfig, flag
from lora_app.training.memory import estimate_memory
from lora_app.training.preflight import quick_check
from lora_app.training.trainer import SAFE_MARGIN, Callbacks, Recipe, preflight

PLAN_STEPS = 4
EVAL_COST = 1 / 3  # a forward pass, against a training step's forward and backward
# what a change does to the time per padded token, beside what it does to the tokens: recomputing the
# activations costs about one more forward pass; on a CPU, bitsandbytes' 4-bit kernels are slower
TIME_FACTORS = {"gradient_checkpointing": 1.3, "quantization": {"cpu": 1.6, "cuda": 1.15}}


@dataclass
class Plan:
    settings: dict  # the run's settings, as TrainConfig.to_dict()
    device: str
    peak_bytes: int  # measured
    formula_bytes: int  # the formula estimate for the same settings
    available_bytes: int  # the memory the machine had free for the run
    startup_seconds: float  # from the process start to the first step (loading, data, model)
    seconds_per_token: float  # per padded token, fitted to the timed steps
    step_seconds: float  # and per step, whatever its size (the optimizer's update, ...)
    train_seconds: float  # predicted: every step and evaluation of the run
    total_steps: int
    alternatives: list[dict] = field(default_factory=list)  # {"changes", "label", "peak_bytes", "seconds", "fits"}

    @property
    def fits(self) -> bool:
        return self.peak_bytes + SAFE_MARGIN <= self.available_bytes

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Plan | None:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def lines(self) -> list[str]:
        """The plan in a few lines of words."""
        verdict = "fits" if self.fits else "does NOT fit"
        out = [f"plan: {verdict}: peak {gib(self.peak_bytes)} measured (the formula said {gib(self.formula_bytes)}) "
               f"of {gib(self.available_bytes)} free on {self.device}",
               f"time: {minutes(self.train_seconds)} for {self.total_steps} steps "
               f"({1 / self.seconds_per_token:.0f} padded tokens/s), after {self.startup_seconds:.0f} s to start"]
        for alt in self.alternatives:
            out.append(f"  {alt['label']:<42} peak {gib(alt['peak_bytes']):>9}  time {minutes(alt['seconds']):>8}  "
                       f"{'fits' if alt['fits'] else 'does not fit':<12}  {flags(alt['changes'])}")
        return out


def flags(changes: dict) -> str:
    """The command-line flags that make a change."""
    return " ".join((flag(k) if v else flag("no_" + k)) if isinstance(v, bool) else f"{flag(k)} {v}"
                    for k, v in changes.items())


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def measure(config: TrainConfig) -> Plan:
    """Train a few of ``config``'s steps in a scratch folder -- its longest first, then others of every
    size -- and predict the run."""
    available = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory(prefix="lora-plan-") as scratch:
        probe = replace(config, output=scratch, resume=False, max_steps=PLAN_STEPS, eval_every=0, save_every=0,
                        probe_prompts=None, probe_rows=0)
        recipe = Recipe(probe, Callbacks(log=lambda text: None), preflight(probe))
        full = _every_step(config, recipe)
        ordered = sorted(full, key=lambda chunks: -_padded(recipe, chunks))
        # the longest step sets the peak; the others (the next longest, a median one, the shortest) show
        # how a step's time grows with its tokens
        picked = [ordered[i] for i in dict.fromkeys([0, 1, len(ordered) // 2, len(ordered) - 1])]
        recipe.total_steps = len(picked)
        recipe.plan.micro_batches = lambda step: picked[step]
        startup = time.time() - psutil.Process().create_time()
        recipe.run()
        del recipe.plan.micro_batches  # the run's own plan again, for the alternatives
    timed = [seconds for seconds, _ in recipe.recent]  # the steps after the first, which warms up
    sizes = [_padded(recipe, chunks) for chunks in picked][-len(timed):]
    step_seconds = _fit(sizes, timed)
    device = recipe.device.type
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plan = Plan(settings=config.to_dict(), device=device, peak_bytes=int(peak),
                formula_bytes=int(recipe.estimate["total_bytes"]), available_bytes=int(available),
                startup_seconds=startup, seconds_per_token=step_seconds[1], step_seconds=step_seconds[0],
                train_seconds=_seconds(config, recipe, full, step_seconds), total_steps=len(full))
    plan.alternatives = alternatives(plan, config, recipe, full)
    return plan


def _fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(seconds per step, seconds per padded token): a least-squares line through the timed steps, or
    through the origin when they are too alike in size (or a step's fixed cost comes out negative)."""
    n, mean_x, mean_y = len(sizes), sum(sizes) / len(sizes), sum(seconds) / len(seconds)
    spread = sum((x - mean_x) ** 2 for x in sizes)
    if n > 1 and spread > 0.05 * mean_x ** 2 * n:
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, seconds)) / spread
        if slope > 0 and mean_y - slope * mean_x >= 0:
            return mean_y - slope * mean_x, slope
    return 0.0, sum(seconds) / max(sum(sizes), 1)


def _every_step(config: TrainConfig, recipe: Recipe) -> list[list[list[int]]]:
    """The micro-batches of every step of the run as configured."""
    total = config.max_steps or max(1, round(config.epochs * recipe.plan.steps_per_epoch))
    return [recipe.plan.micro_batches(step) for step in range(total)]


def _padded(recipe: Recipe, chunks: list[list[int]]) -> int:
    lengths = recipe.plan.lengths
    return sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks)


def _seconds(config: TrainConfig, recipe: Recipe, full, step_seconds: tuple[float, float]) -> float:
    """Every step, and every evaluation, at (seconds per step, seconds per padded token)."""
    per_step, per_token = step_seconds
    steps = sum(per_step + per_token * _padded(recipe, chunks) for chunks in full)
    val = sum(len(example["input_ids"]) for example in recipe.data.val)
    evaluations = (len(full) // config.eval_every if config.eval_every else 0) + 1 if val else 0
    return steps + evaluations * val * per_token * EVAL_COST


def alternatives(plan: Plan, config: TrainConfig, recipe: Recipe, full) -> list[dict]:
    """What each one-step change is predicted to take: the measured figures moved by the formula's
    difference (memory) and by the padded tokens and ``TIME_FACTORS`` (time)."""
    device, options = recipe.device.type, []
    if config.batch_size > 1:
        half = max(1, config.batch_size // 2)
        options.append(("micro-batch halved (same effective batch)",
                        dict(batch_size=half, grad_accum=config.grad_accum * config.batch_size // half), 1.0))
    if not config.gradient_checkpointing:
        options.append(("gradient checkpointing", dict(gradient_checkpointing=True),
                        TIME_FACTORS["gradient_checkpointing"]))
    if config.quantization == "none" and config.variant != "delta-lora":
        options.append(("4-bit base (QLoRA)", dict(quantization="4bit"), TIME_FACTORS["quantization"][device]))
    if config.rank > 4:
        options.append((f"rank {config.rank // 2}", dict(rank=config.rank // 2), 1.0))
    if config.seq_len >= 128:
        options.append((f"sequence length {config.seq_len // 2}", dict(seq_len=config.seq_len // 2), None))
    precision = choose_precision(config.precision, device)
    now = recipe.estimate["total_bytes"]
    rows = []
    for label, changes, factor in options:
        other = replace(config, **changes)
        tokens = recipe.plan.largest_micro_batch()
        if "batch_size" in changes:
            tokens = tokens * other.batch_size // config.batch_size
        if "seq_len" in changes:
            tokens = tokens * other.seq_len // config.seq_len
        formula = estimate_memory(other, recipe.model.config, device, precision, tokens=tokens)["total_bytes"]
        peak = max(plan.peak_bytes + formula - now, 0)
        if factor is None:  # a shorter sequence: fewer tokens per step, as many steps
            cut = other.seq_len
            padded = sum(len(chunk) * min(max(recipe.plan.lengths[i] for i in chunk), cut) for chunks in full
                         for chunk in chunks)
            seconds = plan.train_seconds * padded / max(sum(_padded(recipe, chunks) for chunks in full), 1)
        else:
            seconds = plan.train_seconds * factor
        rows.append(dict(label=label, changes=changes, peak_bytes=int(peak), seconds=seconds,
                         fits=peak + SAFE_MARGIN <= plan.available_bytes))
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":
        argv = argv[1:]
    p = cli.parser()
    p.prog, p.description = "python -m lora_app plan", ("Measure what a run needs: train a few of its longest "
                                                        "steps, then predict its peak memory and time, and "
                                                        "what fits instead.")
    p.add_argument("--out", help="also write the plan as JSON to this file")
    args = vars(p.parse_args(argv))
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="lora-plan-") as output:  # a plan keeps no run folder
            config = cli.build_config({**args, "output": output})
            quick_check(config)
            plan = measure(config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "out" in args:
        plan.save(args["out"])
    print(json.dumps(asdict(plan)) if "json" in args else "\n".join(plan.lines()), flush=True)
    return 0

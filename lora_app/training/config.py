"""A training run's settings, declared once.

Every setting is one field of ``TrainConfig`` with its type, default, meaning (``help``), group and
checks. Everything else is derived from these declarations: the command line
(``training/cli.py``), the studio form (``ui/form.py``), the YAML/JSON config files and the run's
``config.json``. The adapter settings carry the LoRA core's own names, and ``lora_config()`` is the
one conversion to its ``LoraConfig``, which checks them. Importable without torch.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from lora_app.data.formats import FORMATS
from lora_app.data.templates import TEMPLATES, SystemPrompt
from lora_app.errors import LoraConfigError, TrainConfigError
from lora_app.lora.config import QUANTIZATIONS, VARIANTS, LoraConfig
from lora_app.paths import write_json
from lora_app.training.schedule import SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BATCHINGS = ("grouped", "random", "packed")  # see training/batches.py
MAX_PROBES = 8  # probe prompts a run may carry: each one is answered at every evaluation
GROUPS = ("data", "model", "adapter", "optimization", "evaluation and checkpoints", "run")


def setting(default, help: str, group: str, *, label: str | None = None, choices: tuple | None = None,
            above: float | None = None, at_least: float | None = None, below: float | None = None,
            unset: str | None = None, lora: bool = False, required: bool = False, resumable: bool = False):
    """A TrainConfig field. ``choices``: the allowed values; ``above`` / ``at_least`` / ``below``: the
    bounds a number must keep; ``unset``: what None means, for a setting that may be left unset;
    ``lora``: a field of the same name in the core's ``LoraConfig``, which checks it; ``required``: a
    run cannot start without it (None is allowed while editing); ``resumable``: a resumed run may
    change it (every other setting stays as the run was configured)."""
    assert group in GROUPS, group
    meta = dict(help=help, group=group, label=label, choices=choices, above=above, at_least=at_least, below=below,
                unset=unset, lora=lora, required=required, resumable=resumable)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # data
    data: str | None = setting(None, "training data: a file (JSON, JSONL, CSV, TSV, Parquet, TXT) or a folder",
                               "data", required=True)
    val_data: str | None = setting(None, "validation data file (instead of a validation fraction)", "data",
                                   label="validation data", unset="none")
    val_fraction: float = setting(0.0, "share of the training rows held out for validation", "data",
                                  label="validation fraction", at_least=0, below=1)
    data_format: str | None = setting(None, "the dataset's layout", "data", label="data format",
                                      choices=tuple(FORMATS), unset="detected from the columns")
    data_mapping: dict | None = setting(None, "map the layout's fields to your columns by hand: field=column,... "
                                        "(e.g. instruction=question,output=answer)", "data", label="column mapping",
                                        unset="the layout's own column names")
    template: str | None = setting(None, "chat template", "data", choices=TEMPLATES,
                                   unset="the tokenizer's own, else alpaca")
    system_prompt: str | None = setting(None, "one system prompt for every conversation, replacing the dataset's "
                                        "own; chat uses it too", "data", label="system prompt",
                                        unset="the dataset's own")
    default_system_prompt: bool = setting(True, "where a conversation has no system prompt, let the chat template "
                                          "add its default one (SmolLM2's says it is SmolLM, made by Hugging Face)",
                                          "data", label="template's default system prompt")
    train_on_prompt: bool = setting(False, "train on the prompts too, not only the assistant's turns", "data")
    seq_len: int = setting(512, "longest example in tokens; longer ones are truncated", "data",
                           label="sequence length", above=0)
    batching: str = setting("grouped", "grouped: rows of similar length share a batch (less padding), re-drawn every "
                            "epoch; random: as transformers' Trainer; packed: short rows concatenated up to the "
                            "sequence length", "data", choices=BATCHINGS)
    # model
    model: str = setting("default", "'default' (the embedded SmolLM2-135M-Instruct), a Hub id or a local folder",
                         "model")
    quantization: str = setting("none", "load the base model quantized: 4bit is QLoRA", "model",
                                choices=QUANTIZATIONS)
    double_quant: bool = setting(True, "4-bit: quantize the quantization constants too (saves ~0.4 bit/weight)",
                                 "model", label="double quantization")
    trust_remote_code: bool = setting(False, "run the model repository's own Python code (only for repositories "
                                      "you trust)", "model")
    # adapter (LoraConfig's fields, under its names)
    rank: int = setting(8, "LoRA rank r: the adapter's inner size", "adapter", lora=True)
    alpha: float = setting(16.0, "LoRA alpha: the update is scaled by alpha / r", "adapter", lora=True)
    dropout: float = setting(0.05, "dropout on the adapter's input", "adapter", lora=True)
    targets: str | None = setting(None, "layers to adapt: comma list of module names, a regex, or all-linear",
                                  "adapter", unset="the architecture's attention and MLP projections", lora=True)
    variant: str = setting("lora", "lora, rslora (alpha/sqrt r), dora (weight-decomposed), lora-fa (A frozen), "
                           "vera (shared random projections), delta-lora (also moves the base weights)", "adapter",
                           choices=VARIANTS, lora=True)
    delta_lambda: float = setting(0.5, "delta-lora: how far each step moves the base weights", "adapter", lora=True)
    # optimization
    epochs: float = setting(1.0, "passes over the training data (when max steps is unset)", "optimization",
                            above=0, resumable=True)
    max_steps: int | None = setting(None, "optimizer steps to train; overrides epochs", "optimization",
                                    label="max steps", above=0, unset="use epochs", resumable=True)
    batch_size: int = setting(4, "examples per micro-batch", "optimization", label="batch size", above=0)
    grad_accum: int = setting(1, "micro-batches per optimizer step (effective batch = batch size x this)",
                              "optimization", label="gradient accumulation", above=0)
    max_batch_tokens: int | None = setting(None, "cap on padded tokens per micro-batch (0: none); the optimizer "
                                           "step is the same either way", "optimization", label="max batch tokens",
                                           at_least=0, unset="512 on a CPU, none on a GPU")
    lr: float = setting(2e-4, "peak learning rate", "optimization", label="learning rate", above=0)
    lora_plus_ratio: float | None = setting(None, "LoRA+: B learns this many times faster than A (16 is typical)",
                                            "optimization", label="LoRA+ ratio", above=0, unset="off")
    weight_decay: float = setting(0.0, "AdamW weight decay", "optimization", label="weight decay", at_least=0)
    scheduler: str = setting("cosine", "learning-rate schedule after warmup", "optimization", choices=tuple(SCHEDULES))
    warmup: float = setting(0.03, "warmup: a fraction of the steps (< 1) or a number of steps (>= 1)",
                            "optimization", at_least=0)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0: no clipping)", "optimization",
                                   label="max grad norm", at_least=0)
    seed: int = setting(42, "random seed: data order, validation split, adapter init, dropout", "optimization")
    # evaluation and checkpoints
    eval_every: int = setting(0, "evaluate every this many steps (0: at the end only, when there is validation "
                              "data)", "evaluation and checkpoints", label="eval every", at_least=0,
                              resumable=True)
    save_every: int = setting(0, "save a checkpoint every this many steps (0: only the final adapter, and a "
                              "checkpoint when cancelled)", "evaluation and checkpoints", label="save every",
                              at_least=0, resumable=True)
    log_every: int = setting(1, "log metrics every this many steps", "evaluation and checkpoints",
                             label="log every", above=0, resumable=True)
    probe_prompts: list[str] | None = setting(None, "prompts the run answers at step 0 (the base model), at every "
                                              "evaluation and checkpoint, and at the end, so you see the answers "
                                              "change (on the command line: a file, one prompt per line)",
                                              "evaluation and checkpoints", label="probe prompts", unset="none",
                                              resumable=True)
    probe_rows: int = setting(0, "also probe with this many validation rows, their answers kept as references "
                              "(each answer is scored by token F1 against its reference)", "evaluation and checkpoints",
                              label="probe rows", at_least=0, resumable=True)
    probe_budget: float = setting(0.05, "the largest share of the run's time probe answers may take: a round at an "
                                  "evaluation or checkpoint that would go over it is skipped (the first and the last "
                                  "always run); 0: no limit", "evaluation and checkpoints", label="probe time budget",
                                  at_least=0, below=1, resumable=True)
    probe_tokens: int = setting(48, "longest probe answer, in tokens (greedy: the same prompt at the same step always "
                                "gets the same answer)", "evaluation and checkpoints", label="probe answer tokens",
                                above=0, resumable=True)
    # run
    output: str | None = setting(None, "run folder (never overwritten; resume continues one)", "run",
                                 required=True)
    resume: bool = setting(False, "continue the run in the output folder from its last checkpoint, as it was "
                                  "configured", "run", resumable=True)
    precision: str = setting("auto", "auto: bf16 where the hardware has it natively, else fp32 (fp16 on older GPUs)",
                             "run", choices=PRECISIONS)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, "
                                           "~30 % slower", "run")
    cpu_lanes: int | None = setting(None, "on a CPU, micro-batches trained side by side, each by its share of the "
                                    "cores (1: one at a time on all cores); the update is the same", "run",
                                    label="CPU lanes", at_least=1, unset="2 in fp32 with two cores or more, else 1")

    # -- checks ---------------------------------------------------------------------------------
    def problems(self) -> dict[str, str]:
        """Everything wrong with these settings, by setting, in plain words (empty when all is well)."""
        found = {}
        for f in fields(self):
            if not f.metadata["lora"]:
                problem = _check(f, getattr(self, f.name))
                if problem:
                    found[f.name] = problem
        try:
            self.lora_config()
        except LoraConfigError as err:
            found.update(err.problems)
        if self.max_steps is not None:
            found.pop("epochs", None)  # epochs are not used
        probes = len(self.probe_prompts) if isinstance(self.probe_prompts, list) else 0
        probes += self.probe_rows if isinstance(self.probe_rows, int) else 0
        if probes > MAX_PROBES and "probe_prompts" not in found:
            found["probe_prompts"] = (f"{probes} probe prompts (typed and validation rows together): at most "
                                      f"{MAX_PROBES}, as every one is answered at every evaluation")
        if self.probe_rows and not (self.val_fraction or self.val_data):
            found["probe_rows"] = "probe rows come from the validation rows: set a validation fraction or file"
        if self.variant == "delta-lora" and self.quantization != "none":
            found["quantization"] = "delta-lora updates the base weights, so it needs quantization 'none'"
        order = [f.name for f in fields(self)]
        return dict(sorted(found.items(), key=lambda item: order.index(item[0])))

    def validate(self) -> TrainConfig:
        problems = self.problems()
        if problems:
            raise TrainConfigError(problems)
        return self

    def system(self) -> SystemPrompt:
        """The system turn the conversations are trained (and chatted) with."""
        return SystemPrompt(self.system_prompt, self.default_system_prompt)

    def lora_config(self) -> LoraConfig:
        """The core's settings for this run's adapter (raises ``LoraConfigError`` when they are invalid)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["lora"]}
        return LoraConfig(**values, base_model_name_or_path=str(self.model))

    # -- files ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """From a mapping with the fields' names (``-`` and ``_`` alike); unknown keys are refused."""
        values = {key.replace("-", "_"): value for key, value in values.items()}
        if "packing" in values:  # the setting that batching replaced, in runs stored before it
            values["batching"] = "packed" if values.pop("packing") else values.get("batching", "grouped")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TrainConfigError({"config": f"unknown setting(s) in the config: {', '.join(unknown)}"})
        return cls(**values)

    @classmethod
    def resumed(cls, given: dict) -> TrainConfig:
        """The run in ``given["output"]`` as it was configured (its config.json), with the resumable
        settings that ``given`` changes; any other difference is refused, each one named."""
        stored_file = Path(given.get("output") or "") / "config.json"
        if not given.get("output") or not stored_file.is_file():
            return cls.from_dict(given)  # preflight says that there is nothing to resume
        stored = cls.from_file(stored_file)
        wanted = cls.from_dict({**stored.to_dict(), **given})
        may_change = ", ".join(label(f) for f in fields(cls) if f.metadata["resumable"] and f.name != "resume")
        differences = {f.name: f"{label(f)} was {getattr(stored, f.name)!r} when this run started, not "
                               f"{getattr(wanted, f.name)!r}" for f in fields(cls)
                       if not f.metadata["resumable"] and getattr(wanted, f.name) != getattr(stored, f.name)}
        if differences:
            differences["resume"] = (f"a resumed run keeps its settings (only {may_change} may change); "
                                     "to change the others, start a new run with another --output")
            raise TrainConfigError(differences)
        return wanted

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a YAML or JSON config file (the same keys as the fields, as in a run's config.json)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise TrainConfigError({"config": f"cannot read the config file {path}: {err.strerror}"}) from err
        try:
            values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as err:
            kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
            raise TrainConfigError({"config": f"the config file {path} is not valid {kind}: {err}"}) from err
        if not isinstance(values, dict):
            raise TrainConfigError({"config": f"the config file {path} must hold a mapping of settings"})
        return cls.from_dict(values)

    def write(self, path: str | Path) -> None:
        """Write the settings as JSON (a run's ``config.json``), atomically."""
        write_json(path, self.to_dict())


# ---- what the declarations say, for the layers that derive from them -----------------------------
def flag(name: str) -> str:
    """The command-line option of setting ``name``."""
    return "--" + name.replace("_", "-")


def label(f) -> str:
    """The setting's name in words ("learning rate")."""
    return f.metadata["label"] or f.name.replace("_", " ")


def value_type(f) -> type:
    """The field's value type without None: int, float, bool, str, dict or list (of text)."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def optional(f) -> bool:
    """Whether None (unset) is an allowed value."""
    return type(None) in typing.get_args(typing.get_type_hints(TrainConfig)[f.name])


def _check(f, value) -> str | None:
    """What is wrong with ``value`` for field ``f``, or None."""
    name, kind, meta = label(f), value_type(f), f.metadata
    if value is None:
        return f"no {name} given ({flag(f.name)})" if meta["required"] or not optional(f) else None
    if meta["choices"] is not None:
        return None if value in meta["choices"] else \
            f"unknown {name} {value!r} (choose from {', '.join(meta['choices'])})"
    if kind is list:
        ok = isinstance(value, list) and all(isinstance(item, str) and item.strip() for item in value)
        return None if ok else f"the {name} must be a list of non-empty texts (got {value!r})"
    if kind is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        return None if ok else f"the {name} must map field names to column names (got {value!r})"
    if kind is bool or kind is str:
        return None if isinstance(value, kind) else f"{name} must be {'true or false' if kind is bool else 'text'} " \
                                                    f"(got {value!r})"
    whole = kind is int
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        return f"{name} must be a {'whole number' if whole else 'number'} (got {value!r})"
    low, high = meta["above"] if meta["above"] is not None else meta["at_least"], meta["below"]
    too_low = low is not None and (value <= low if meta["above"] is not None else value < low)
    if too_low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f"{'>' if meta['above'] is not None else '>='} {low}"
        return f"{name} must be {'a whole number ' if whole else ''}{bound} (got {value!r})"
    return None

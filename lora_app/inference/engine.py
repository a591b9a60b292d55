"""The inference engine: base models kept in memory, each with its adapters.

    engine = InferenceEngine()                                   # the GPU or the CPU, in its native precision
    base = engine.base("default")                                # loaded once, then reused
    name = base.load_adapter("runs/my-run/adapter")              # or an uploaded folder / .zip
    for piece in base.stream("Hello!", mode=name): print(piece, end="")
    base.set_mode(Mode.mix({"a": 0.7, "b": 0.3}))                # a pointer change, no reload
    base.iter_compare("Hello!", ["a", "b"], mix={"a": 0.5, "b": 0.5})  # side by side, same seed

One base model per (model, quantization, device) stays loaded — the expensive part — and a few
(``max_bases``) are kept, least recently used dropped first. Adapters are small and hang off their
base (see ``LoadedBase`` and ``AdapterCache``). While a training job holds the GPU, ask for
``device="cpu"`` (or ``gpu_busy=True`` with "auto") to serve from the CPU: see ``devices``.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from lora_app.inference.base import BaseKey, LoadedBase
from lora_app.inference import blocked
from lora_app.inference.decode import column_major, fp32_prompt_passes
from lora_app.inference.devices import choose_device
from lora_app.errors import InferenceError
from lora_app.hardware import Precision, choose_precision, generation_precision
from lora_app.model_source import DEFAULT_MODEL
from lora_app.models import load_model
from lora_app.paths import app_home

DEFAULT_ADAPTER_BUDGET = 2**30  # 1 GiB of adapter parameters: dozens of typical rank-8..64 adapters


def default_work_dir() -> Path:
    """Where the engine keeps its files (unpacked adapter zips): ``LORA_APP_HOME/inference``."""
    return app_home() / "inference"


class InferenceEngine:
    """Thread-safe; one per process is enough (the UI shares one across browser sessions).

    ``device``: "auto" (GPU if any, else CPU), "cpu", "cuda" or "cuda:N"; ``dtype``: None picks
    ``hardware.generation_precision`` for chat (bf16 weights wherever that is faster); a base
    ``for_export`` is fp32 on a CPU, so a merged export loses nothing, and training's precision on
    a GPU; ``adapter_budget_bytes``: the adapter parameters each base keeps in RAM before evicting
    the least recently used;
    ``max_bases``: how many base models stay loaded; ``work_dir``: where uploaded zips are unpacked
    (default ``LORA_APP_HOME/inference``); ``loader``: ``load_model``'s stand-in (tests).
    """

    def __init__(self, *, device: str = "auto", dtype: torch.dtype | None = None,
                 adapter_budget_bytes: int = DEFAULT_ADAPTER_BUDGET, max_bases: int = 2,
                 work_dir: str | os.PathLike | None = None, loader=load_model):
        if max_bases < 1:
            raise InferenceError(f"max_bases must be >= 1 (got {max_bases}).")
        if adapter_budget_bytes <= 0:
            raise InferenceError(f"the adapter memory budget must be > 0 bytes (got {adapter_budget_bytes}).")
        self.device, self.dtype = device, dtype
        self.adapter_budget_bytes, self.max_bases = int(adapter_budget_bytes), max_bases
        self._work_dir = Path(work_dir) if work_dir else None
        self._loader = loader
        self._bases: OrderedDict[BaseKey, LoadedBase] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def work_dir(self) -> Path:
        return self._work_dir or default_work_dir()

    def key(self, model: str | os.PathLike | None = DEFAULT_MODEL, quantization: str | None = None, *,
            device: str | None = None, gpu_busy: bool = False, for_export: bool = False) -> BaseKey:
        """The key a request maps to (device and precision resolved, local paths made absolute)."""
        name = str(model) if model not in (None, "") else DEFAULT_MODEL
        if name != DEFAULT_MODEL and Path(name).expanduser().exists():
            name = str(Path(name).expanduser().resolve())
        quantization = None if quantization in (None, "", "none") else quantization
        device = choose_device(device or self.device, gpu_busy=gpu_busy).device
        device_type = torch.device(device).type
        if self.dtype is not None:
            precision = Precision.of(self.dtype, "chosen by the caller")
        elif for_export and device_type == "cpu":  # memory is cheaper than lost bits in an export
            precision = Precision("fp32", "exports merge in full precision on a CPU")
        elif for_export or quantization:  # a 4/8-bit base computes in training's precision
            precision = choose_precision("auto", device_type)
        else:
            precision = generation_precision(device_type)
        return BaseKey(name, quantization, device, precision)

    def base(self, model: str | os.PathLike | None = DEFAULT_MODEL, quantization: str | None = None, *,
             device: str | None = None, gpu_busy: bool = False, for_export: bool = False) -> LoadedBase:
        """The loaded base for (model, quantization, device, precision), loading it on first use;
        ``for_export``: the one to merge and export from. Raises ``ModelLoadError`` (a ValueError)
        when the model cannot be loaded."""
        key = self.key(model, quantization, device=device, gpu_busy=gpu_busy, for_export=for_export)
        with self._lock:
            if key in self._bases:
                self._bases.move_to_end(key)
                return self._bases[key]
            while len(self._bases) >= self.max_bases:
                self._drop(next(iter(self._bases)))
            loaded_model, tokenizer = self._loader(key.model, key.quantization, dtype=key.precision.dtype,
                                                   device=key.device)
            loaded_model.eval()
            column_major(loaded_model)
            if key.precision.fp32_prompts:
                fp32_prompt_passes(loaded_model)
            elif blocked.supported():
                blocked.blocked_weights(loaded_model)
            base = LoadedBase(key, loaded_model, tokenizer, adapter_budget_bytes=self.adapter_budget_bytes,
                              unzip_root=self.work_dir / "unzipped")
            self._bases[key] = base
            return base

    def loaded(self) -> list[BaseKey]:
        """The bases in memory, least recently used first."""
        with self._lock:
            return list(self._bases)

    def bases(self) -> list[LoadedBase]:
        """The loaded bases themselves, least recently used first (using none of them)."""
        with self._lock:
            return list(self._bases.values())

    def _drop(self, key: BaseKey) -> None:
        del self._bases[key]
        if key.device.startswith("cuda"):
            torch.cuda.empty_cache()

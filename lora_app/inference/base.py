"""One base model in memory, its adapters, and everything that runs on it.

A ``LoadedBase`` owns a model, its tokenizer and an ``AdapterCache``; it serves chat, raw completion,
comparisons and exports, switching between modes as requests ask. The model's active adapters are
shared state, so one lock covers "switch mode, then generate": requests from several browser sessions
queue on it and each runs in the mode it asked for. The lock is a plain ``threading.Lock`` (not an
RLock) because Gradio may advance a streaming generator from different worker threads; internal
helpers named ``_locked_*`` expect the caller to hold it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lora_app.hardware import Precision
from lora_app.inference.cache import AdapterCache, AdapterInfo
from lora_app.inference.compare import ComparisonResult, comparison_modes
from lora_app.inference.blocked import BlockedLinear, folded_adapters
from lora_app.errors import InferenceError
from lora_app.inference.export import write_merged
from lora_app.inference.gguf_export import GgufExport, export_gguf, write_adapter_gguf
from lora_app.inference.modes import Mode
from lora_app.data.templates import PromptFormat, SystemPrompt
from lora_app.inference.prompts import encode_prompt
from lora_app.inference.settings import GenerationSettings
from lora_app.inference.sources import adapter_name_for, resolve_source
from lora_app.inference.streaming import Generation, GenerationStream
from lora_app.lora import (bypass_idle, is_merged, merge_adapters, pack_adapters, set_active_adapters,
                           unmerge_adapters)
from lora_app.models import eos_token_ids


@dataclass(frozen=True)
class BaseKey:
    """What identifies a loaded base: the model as the user named it, quantization, device and the
    precision its weights are held in."""

    model: str
    quantization: str | None
    device: str
    precision: Precision


class LoadedBase:
    """A base model with any number of adapters; every public method is thread-safe."""

    def __init__(self, key: BaseKey, model, tokenizer, *, adapter_budget_bytes: int, unzip_root: Path):
        self.key = key
        self.model = model
        self.tokenizer = tokenizer
        self.cache = AdapterCache(model, adapter_budget_bytes)
        self.unzip_root = Path(unzip_root)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self._mode = Mode.base()
        self._packed = False  # see _locked_ready
        self._groups = list(dict.fromkeys(m.group for m in model.modules() if isinstance(m, BlockedLinear)))
        self._deltas, self._folded = {}, set()  # the packed mode's adapters in the groups: see _locked_ready
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ state
    @property
    def mode(self) -> Mode:
        """The mode the model is in now (requests that pass their own ``mode`` switch it)."""
        return self._mode

    @property
    def busy(self) -> bool:
        """True while a generation, comparison, switch or export runs (a new request would wait)."""
        return self._lock.locked()

    @property
    def quantized(self) -> bool:
        return self.key.quantization not in (None, "none")

    @property
    def precision(self) -> str:
        """What the model computes in and where, for a status line: "fp32 on cpu", "bf16 on cuda:0"."""
        return f"{self.key.precision.label} on {self.key.device}"

    def adapters(self) -> list[AdapterInfo]:
        """Every adapter given to this base, least recently used first (evicted ones included)."""
        with self._lock:
            return self.cache.info()

    # --------------------------------------------------------------------------------- adapters
    def load_adapter(self, source: str | os.PathLike, name: str | None = None) -> str:
        """Attach the adapter in ``source`` (an adapter folder, a run folder holding one, or a .zip)
        and return its name: ``name``, or one made from the folder (a run's name for its
        ``adapter`` folder, the zip's name for a zip). Loading the same unchanged folder again reads
        nothing and returns the name it already has, even when another ``name`` is asked for (one
        copy per adapter); a folder whose files changed is reloaded. Does not change the mode.
        Raises ``InferenceError`` for a missing/corrupt/unsafe file, an adapter for another base or
        a ``name`` taken by another adapter; nothing loaded before is affected."""
        folder = resolve_source(source, self.unzip_root)
        if name is not None and (not name.strip() or "." in name):
            raise InferenceError(f"an adapter name must be non-empty and contain no '.' (got {name!r}).")
        with self._lock:
            known = self.cache.lookup(folder)
            if known is not None:
                self.cache.use([known], pinned=self._mode.adapters)
                return known
            self._packed = False  # an eviction may drop packs
            with self._locked_unmerged():
                return self.cache.add(folder, name or adapter_name_for(folder), explicit=name is not None,
                                      pinned=self._mode.adapters)

    # ------------------------------------------------------------------------------------ modes
    def set_mode(self, mode: Mode | str | list | dict | None, merged: bool = False) -> float:
        """Switch to ``mode`` (see ``Mode.of``); returns the seconds it took. Between unmerged modes
        this only changes which adapters act (no weight is touched); entering merged mode folds the
        weights in, leaving it restores them. On error the previous mode stays."""
        mode = Mode.of(mode, merged)
        with self._lock:
            start = time.perf_counter()
            self._locked_switch(mode)
            return time.perf_counter() - start

    def _locked_switch(self, mode: Mode) -> None:
        if mode == self._mode and mode.merged == is_merged(self.model, layers=self.cache.layers()):
            self.cache.use(mode.adapters, pinned=mode.adapters)
            return
        if mode.merged and self.quantized:
            raise InferenceError(
                f"merged mode is not available on a {self.key.quantization} base: folding an adapter into "
                "quantized weights loses most of it. Use the adapter unmerged, or export a merged model."
            )
        previous = self._mode
        try:
            self._locked_apply(mode)
        except (InferenceError, ValueError, KeyError) as err:
            try:
                self._locked_apply(previous)
            except (InferenceError, ValueError, KeyError):  # e.g. its adapter's folder is gone now
                self._locked_apply(Mode.base())
            if isinstance(err, InferenceError):
                raise
            raise InferenceError(str(err)) from err

    def _locked_apply(self, mode: Mode) -> None:
        unmerge_adapters(self.model, layers=self.cache.layers())  # before the cache may detach anything
        self.cache.use(mode.adapters, pinned=mode.adapters)
        set_active_adapters(self.model, mode.adapters, layers=self.cache.layers())
        if mode.merged:
            merge_adapters(self.model, layers=self.cache.layers())
        self._mode, self._packed = mode, False
        self._locked_reblock()

    def _locked_reblock(self) -> None:
        """Remake the blocked copies of the weights that a merge or unmerge changed
        (``blocked.LinearGroup``): part of the switch, not of the next reply's first token."""
        for group in self._groups:
            group.blocked_weight()

    def _locked_ready(self) -> Callable[[], None]:
        """Before generating. Unmerged: each layer's adapters as one low-rank pair (``LoraLayer.pack``),
        so one adapter costs a few percent of a token and a mix little more; with blocked weights
        (``blocked``) each group of layers then adds its members' pairs itself and their wrappers
        step aside. Done here, once per mode, not when switching: it takes tens of milliseconds
        and a switch should take one. Merged, or the base: the wrappers step aside (``bypass_idle``),
        so the model runs as one that never had adapters. Returns what puts them back, to be called
        before the lock is released."""
        if not self._packed:
            self._deltas, self._folded = {}, set()
            if not self._mode.merged and self._mode.adapters:
                pack_adapters(self.model, layers=self.cache.layers())
                self._deltas, self._folded = folded_adapters(self.cache.layers_by_path())
        self._packed = True
        for group, delta in self._deltas.items():
            group.delta = delta
        self._locked_reblock()  # for the deltas, and loading an adapter under merged weights unmerges and merges again
        restore_wrappers = bypass_idle(self.model, self.cache.layers_by_path(), folded=self._folded)

        def restore() -> None:
            restore_wrappers()
            for group in self._deltas:
                group.delta = None
        return restore

    @contextmanager
    def _locked_unmerged(self):
        """Cache changes detach layers' adapters, which must not happen under merged weights."""
        merged = is_merged(self.model, layers=self.cache.layers())
        if merged:
            unmerge_adapters(self.model, layers=self.cache.layers())
        try:
            yield
        finally:
            if merged:
                merge_adapters(self.model, layers=self.cache.layers())

    # ------------------------------------------------------------------------------- generation
    def stream(self, prompt: str, *, history: Iterable | None = None, system: SystemPrompt | str | None = None,
               raw: bool = False, settings: GenerationSettings | None = None,
               mode: Mode | str | list | dict | None = ..., merged: bool = False) -> GenerationStream:
        """A streaming reply to ``prompt``: iterate it for text pieces, then read ``.result``.

        Chat mode (default): ``[system] + history + prompt`` through the chat template (``system``: text,
        or an adapter's ``SystemPrompt`` -- say, no template default -- as it was trained). ``raw``:
        ``prompt`` is text to continue. ``mode`` (a ``Mode``, None for the base, a name, a list or a
        weights dict, with ``merged``) is switched to first; left out, the current mode is used. The
        prompt is checked now (an empty one raises ``InferenceError`` at once); the model is taken
        only when iteration starts, and released when it ends or the stream is closed.
        """
        settings = settings or GenerationSettings()
        target = None if mode is ... else Mode.of(mode, merged)
        encode_prompt(self.tokenizer, prompt, history=history, system=system, raw=raw)  # fail fast
        acquired, restore = [], []

        def before() -> str:
            self._lock.acquire()
            acquired.append(True)
            if target is not None:
                self._locked_switch(target)
            restore.append(self._locked_ready())
            return self._mode.label

        def after() -> None:
            if acquired:
                acquired.clear()
                try:
                    while restore:
                        restore.pop()()
                finally:
                    self._lock.release()

        return self._stream(prompt, history, system, raw, settings, before, after)

    def _stream(self, prompt, history, system, raw, settings, before=None, after=None) -> GenerationStream:
        def prepare():
            return encode_prompt(self.tokenizer, prompt, history=history, system=system, raw=raw)

        if before is None:  # called under the lock by iter_compare: just label the result
            def before():
                return self._mode.label
        return GenerationStream(self.model, self.tokenizer, prepare, settings, self.eos_token_ids,
                                before=before, after=after)

    def generate(self, prompt: str, **kwargs) -> Generation:
        """Like ``stream`` but waits for the whole reply; returns the ``Generation``."""
        return self.stream(prompt, **kwargs).finish()

    def iter_compare(self, prompt: str, adapters: Iterable[str] = (), *, mix: dict[str, float] | None = None,
                     include_base: bool = True, merged: bool = False, history: Iterable | None = None,
                     system: SystemPrompt | str | None = None, raw: bool = False,
                     settings: GenerationSettings | None = None) -> Iterator[ComparisonResult]:
        """Yield one ``ComparisonResult`` per column (base, each adapter, the mix) as each finishes,
        all from the same prompt, settings and seed. The model is held for the whole comparison and
        the previous mode is restored afterwards."""
        settings = settings or GenerationSettings()
        modes = comparison_modes(list(adapters), mix, include_base, merged)  # bad input fails here, at once
        encode_prompt(self.tokenizer, prompt, history=history, system=system, raw=raw)

        def columns() -> Iterator[ComparisonResult]:
            with self._lock:
                previous = self._mode
                try:
                    for mode in modes:
                        self._locked_switch(mode)
                        restore = self._locked_ready()
                        try:
                            generation = self._stream(prompt, history, system, raw, settings).finish()
                        finally:
                            restore()
                        yield ComparisonResult(mode.label, mode, generation)
                finally:
                    self._locked_switch(previous)

        return columns()

    # ----------------------------------------------------------------------------------- export
    @contextmanager
    def _exporting(self, adapters: str | list | dict | None):
        """Hold the model with ``adapters`` (None: the current mode's) active; the mode is restored after."""
        with self._lock:
            weights = self._mode.adapters if adapters is None else Mode.of(adapters).adapters
            previous = self._mode
            try:
                self._locked_switch(Mode.mix(weights))
                yield
            finally:
                self._locked_switch(previous)

    def export_gguf(self, target: str | os.PathLike, adapters: str | list | dict | None = None,
                    prompt_format: PromptFormat | None = None, **options) -> GgufExport:
        """Write one GGUF file with ``adapters`` merged in (``options``: see ``gguf_export.export_gguf``),
        an Ollama Modelfile beside it, and check both templates against training."""
        with self._exporting(adapters):
            return export_gguf(self.model, self.tokenizer, target, prompt_format, **options)

    def export_adapter_gguf(self, target: str | os.PathLike, adapter: str, overwrite: bool = False) -> Path:
        """Adapter ``adapter`` alone as a llama.cpp LoRA GGUF (``gguf_export.write_adapter_gguf``)."""
        with self._lock:
            return write_adapter_gguf(self.model, adapter, target, overwrite=overwrite)

    def export_merged(self, folder: str | os.PathLike, adapters: str | list | dict | None = None,
                      dtype=None, overwrite: bool = False) -> Path:
        """Write a full model with ``adapters`` (a name, list or weights dict; None: the current
        mode's adapters) merged in, loadable with plain transformers."""
        with self._exporting(adapters):
            return write_merged(self.model, self.tokenizer, folder, dtype=dtype, overwrite=overwrite)

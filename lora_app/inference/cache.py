"""The adapters attached to one base model: loaded once, kept in RAM, evicted least-recently-used.

Each adapter lives on the model itself (in the LoRA wrappers), so "switching" is only choosing which
ones act. This cache decides which adapters stay attached: it remembers every adapter it was given
(name -> folder), keeps the loaded ones in LRU order and, when their parameters exceed the byte
budget, detaches the least recently used ones that the current request does not need. An evicted
adapter is reloaded from its folder on its next use, so eviction costs time, never correctness.

A new adapter is loaded *before* anything is evicted, and the LoRA core checks every tensor before it
touches the model: a corrupt file or an adapter for another base fails with nothing else unloaded.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lora_app.errors import AdapterLoadError, AdapterNameTaken, InferenceError
from lora_app.inference.sources import fingerprint
from lora_app.lora import LoraLayer, adapter_modules, load_adapter, lora_layers, remove_adapter
from lora_app.lora.io import CONFIG_NAME


@dataclass
class AdapterInfo:
    """What the UI shows about one known adapter. ``nbytes``: its parameters in memory (measured at
    its last load); ``loaded``: attached now (False once evicted; it reloads on use); ``loads``:
    how many times it was read from disk."""

    name: str
    folder: Path
    nbytes: int
    loaded: bool
    variant: str
    rank: int
    base_model: str | None
    loads: int = 0
    fingerprint: tuple = field(default=(), repr=False)


def adapter_nbytes(model, name: str) -> int:
    """Bytes of adapter ``name``'s tensors on the model (VeRA's shared projections counted once)."""
    total, seen = 0, set()
    for module in adapter_modules(model, name).values():
        tensors = list(module.parameters())
        projection = getattr(module, "projection", None)
        if projection is not None:
            tensors += [projection.A, projection.B]
        for tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


class AdapterCache:
    """Adapters of one base ``model`` under ``budget_bytes`` of parameters. Not thread-safe on its
    own: the engine calls it under its lock."""

    def __init__(self, model, budget_bytes: int):
        if budget_bytes <= 0:
            raise InferenceError(f"the adapter memory budget must be > 0 bytes (got {budget_bytes}).")
        self.model = model
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[str, AdapterInfo] = OrderedDict()  # least recently used first
        self._layers: dict[str, LoraLayer] | None = None

    def layers_by_path(self) -> dict[str, LoraLayer]:
        """The model's LoRA wrappers by path. Walking the model to find them costs milliseconds
        (thousands of modules once a few adapters are attached) and they only change when an adapter
        is attached or detached, so they are kept and found again after such a change."""
        if self._layers is None:
            self._layers = lora_layers(self.model)
        return self._layers

    def layers(self) -> list[LoraLayer]:
        return list(self.layers_by_path().values())

    # ------------------------------------------------------------------------------------ queries
    def info(self) -> list[AdapterInfo]:
        """Every known adapter, most recently used last."""
        return list(self._entries.values())

    def get(self, name: str) -> AdapterInfo:
        if name not in self._entries:
            known = ", ".join(self._entries) or "none"
            raise InferenceError(f"no adapter named {name!r} is loaded; known adapters: {known}.")
        return self._entries[name]

    def lookup(self, folder: Path) -> str | None:
        """The name of the adapter already loaded from this folder, if its files have not changed."""
        real = os.path.realpath(folder)
        for entry in self._entries.values():
            if os.path.realpath(entry.folder) == real and entry.fingerprint == fingerprint(folder):
                return entry.name
        return None

    # ------------------------------------------------------------------------------------ changes
    def add(self, folder: Path, name: str, *, explicit: bool, pinned: Iterable[str] = ()) -> str:
        """Load the adapter in ``folder`` as ``name`` (made unique unless ``explicit``); returns the
        name. A folder whose files changed since it was loaded replaces its old version."""
        real = os.path.realpath(folder)
        stale = [e.name for e in self._entries.values() if os.path.realpath(e.folder) == real]
        if explicit and name in self._entries and name not in stale:
            raise AdapterNameTaken(f"an adapter named {name!r} is already loaded (from {self._entries[name].folder}); "
                                   "pick another name.", name)
        if not explicit:
            name = stale[0] if stale else self._unique(name)
        entry = AdapterInfo(name=name, folder=Path(folder), nbytes=0, loaded=False, variant="", rank=0,
                            base_model=None)
        self._load(entry, set(pinned), replacing=stale)
        for old in stale:
            if old != name:
                self._entries.pop(old, None)
        self._entries[name] = entry
        self._entries.move_to_end(name)
        return name

    def use(self, names: Iterable[str], pinned: Iterable[str] = ()) -> None:
        """Mark ``names`` as just used, reloading any that were evicted."""
        names = list(names)
        pinned = set(pinned) | set(names)
        for name in names:
            entry = self.get(name)
            if not entry.loaded:
                self._load(entry, pinned)
            self._entries.move_to_end(name)

    # ---------------------------------------------------------------------------------- internals
    def _unique(self, name: str) -> str:
        candidate, i = name, 2
        while candidate in self._entries:
            candidate, i = f"{name}-{i}", i + 1
        return candidate

    def _load(self, entry: AdapterInfo, pinned: set[str], replacing: list[str] = ()) -> None:
        folder = entry.folder
        stamp = fingerprint(folder)
        for old in replacing:  # the previous version of this folder goes first, it is being replaced
            if self._entries[old].loaded:
                self._detach(old)
                self._entries[old].loaded = False
        try:
            config = load_adapter(self.model, folder, entry.name, activate=False)
        except AdapterLoadError as err:
            raise InferenceError(self._explain(folder, err)) from err
        self._layers = None  # new layers may have been wrapped
        entry.nbytes = adapter_nbytes(self.model, entry.name)
        entry.loaded, entry.loads, entry.fingerprint = True, entry.loads + 1, stamp
        entry.variant, entry.rank, entry.base_model = config.variant, config.rank, config.base_model_name_or_path
        try:
            self._fit_budget(entry, pinned | {entry.name})
        except InferenceError:
            self._detach(entry.name)
            entry.loaded = False
            raise

    def _fit_budget(self, entry: AdapterInfo, pinned: set[str]) -> None:
        """Evict least-recently-used unpinned adapters until the loaded ones fit the budget."""
        others = [e for e in self._entries.values() if e.loaded and e.name != entry.name]
        total = entry.nbytes + sum(e.nbytes for e in others)
        victims = []
        for other in others:  # LRU order
            if total <= self.budget_bytes:
                break
            if other.name not in pinned:
                victims.append(other)
                total -= other.nbytes
        if total > self.budget_bytes:
            raise InferenceError(
                f"adapter {entry.name!r} needs {_mib(entry.nbytes)} and the adapters in use need {_mib(total)} "
                f"in all, more than the adapter memory budget of {_mib(self.budget_bytes)}; raise the budget "
                "or use fewer adapters at once."
            )
        for victim in victims:
            self._detach(victim.name)
            victim.loaded = False

    def _detach(self, name: str) -> None:
        remove_adapter(self.model, name)
        self._layers = None

    def _explain(self, folder: Path, err: AdapterLoadError) -> str:
        message = f"Could not load the adapter in {folder}: {err}"
        if err.kind == "base":
            this = getattr(self.model, "name_or_path", None) or type(self.model).__name__
            trained_on = _trained_on(folder)
            said = f" The adapter says it was trained on {trained_on!r};" if trained_on else ""
            message += f"{said} the base model loaded here is {this!r}. The base model still works as before."
        return message


def _trained_on(folder: Path) -> str | None:
    """The base model the adapter's config names, if it names one (only the small JSON is read)."""
    try:
        return json.loads((folder / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

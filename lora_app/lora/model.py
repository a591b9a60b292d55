"""Putting adapters on a model and choosing which ones act.

There is no wrapper model and no registry: adapters live in the ``LoraLayer`` wrappers that replace
the targeted layers, and everything here walks those wrappers.

Finding them means walking every module of the model: milliseconds on a real model, too slow for
code that switches adapters on every request. The switching functions (``set_active_adapters``,
``merge_adapters``, ``unmerge_adapters``, ``is_merged``) therefore take an optional ``layers``, the
list ``lora_layers(model).values()`` kept by the caller; it only changes when an adapter is
attached or detached.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

from torch import nn

from lora_app.lora.adapters import ADAPTER_CLASSES, DoraAdapter, VeraAdapter, VeraProjection
from lora_app.lora.config import LoraConfig
from lora_app.lora.layer import LoraLayer
from lora_app.lora.quant import dequantized_weight
from lora_app.lora.targets import resolve_targets


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every wrapped layer by its path in the original model (the path adapters are saved under)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _layers(model: nn.Module, layers: Iterable[LoraLayer] | None) -> list[LoraLayer]:
    return list(lora_layers(model).values() if layers is None else layers)


def adapter_names(model: nn.Module) -> list[str]:
    return _adapter_names(lora_layers(model).values())


def _adapter_names(layers: Iterable[LoraLayer]) -> list[str]:
    names: dict[str, None] = {}
    for layer in layers:
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def adapter_modules(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """The per-layer modules of adapter ``name``, by layer path."""
    return {path: layer.adapters[name] for path, layer in lora_layers(model).items() if name in layer.adapters}


def adapter_config(model: nn.Module, name: str) -> LoraConfig:
    modules = adapter_modules(model, name)
    if not modules:
        raise KeyError(f"no adapter named {name!r}; the model has: {', '.join(adapter_names(model)) or 'none'}")
    return next(iter(modules.values())).config


def _wrap(model: nn.Module, path: str) -> LoraLayer:
    module = model.get_submodule(path)
    if isinstance(module, LoraLayer):
        return module
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layer = LoraLayer(module)
    layer.train(module.training)  # a new module starts in training mode; keep the model's mode
    setattr(parent, child, layer)
    return layer


def add_adapter(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    *,
    paths: list[str] | None = None,
    projection: VeraProjection | None = None,
    activate: bool = True,
) -> list[str]:
    """Attach a new adapter to the layers ``config.targets`` selects (or exactly ``paths``).

    Base parameters are frozen; the new adapter's trainable parameters require grad. With
    ``activate`` the new adapter becomes the only active one. Returns the adapted layer paths.
    """
    if not name or "." in name:
        raise ValueError(f"adapter name must be non-empty and contain no '.' (got {name!r})")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}")
    paths = paths or resolve_targets(model, config.targets)
    for param in model.parameters():
        param.requires_grad_(False)
    attach(model, config, name, paths, projection)
    if activate:
        set_active_adapters(model, name)
    return paths


def attach(model: nn.Module, config: LoraConfig, name: str, paths: list[str],
           projection: VeraProjection | None = None) -> None:
    """Create adapter ``name`` on the layers at ``paths`` (wrapping them if needed). VeRA layers share
    one projection, sized for the largest layer, unless one is given (e.g. loaded from a file)."""
    layers = [_wrap(model, path) for path in paths]
    if config.variant == "vera" and projection is None:
        max_in = max(layer.in_features for layer in layers)
        max_out = max(layer.out_features for layer in layers)
        projection = VeraProjection(config.rank, max_in, max_out, seed=config.vera_seed)
    cls = ADAPTER_CLASSES[config.variant]
    for layer in layers:
        base = layer.base_layer
        args = (layer.in_features, layer.out_features, config)
        if cls is VeraAdapter:
            adapter = cls(*args, projection, device=base.weight.device)
        elif cls is DoraAdapter:
            adapter = cls(*args, device=base.weight.device, base_weight=dequantized_weight(base))
        else:
            adapter = cls(*args, device=base.weight.device)
        adapter.train(layer.training)  # in an eval-mode model, dropout must stay off
        layer.adapters[name] = adapter


def remove_adapter(model: nn.Module, name: str) -> None:
    """Detach adapter ``name`` everywhere (unmerging first if it is merged)."""
    for layer in lora_layers(model).values():
        if name in layer.adapters:
            layer.unmerge()
            del layer.adapters[name]
            layer.active.pop(name, None)
            layer.packed = None


def set_active_adapters(model: nn.Module, adapters: str | list[str] | dict[str, float] | None,
                        layers: Iterable[LoraLayer] | None = None) -> None:
    """Choose what acts: None (the base model), one name, several names (weight 1 each), or a
    weighted mix ``{"a": 0.7, "b": 0.3}``. Leaves merged mode first, so the switch is exact.
    Raises ``KeyError`` for a name no layer has."""
    if adapters is None:
        weights: dict[str, float] = {}
    elif isinstance(adapters, str):
        weights = {adapters: 1.0}
    elif isinstance(adapters, dict):
        weights = {k: float(v) for k, v in adapters.items()}
    else:
        weights = dict.fromkeys(adapters, 1.0)
    layers = _layers(model, layers)
    missing = [n for n in weights if not any(n in layer.adapters for layer in layers)]
    if missing:
        known = ", ".join(_adapter_names(layers)) or "none"
        raise KeyError(f"unknown adapter(s) {', '.join(missing)}; the model has: {known}")
    unmerge_adapters(model, layers)
    for layer in layers:
        # Refilled in place: assigning a new dict would go through the slow nn.Module.__setattr__.
        layer.active.clear()
        layer.active.update((n, w) for n, w in weights.items() if n in layer.adapters)
        layer.packed = None


def pack_adapters(model: nn.Module, layers: Iterable[LoraLayer] | None = None) -> None:
    """For inference only: run each layer's active mix as one low-rank pair (``LoraLayer.pack``).
    The next ``set_active_adapters`` or ``remove_adapter`` drops the packs; adapter weights must not
    change in between (the inference engine never trains)."""
    for layer in _layers(model, layers):
        layer.pack()


def bypass_idle(model: nn.Module, layers: dict[str, LoraLayer] | None = None,
                folded: Container[str] = ()) -> Callable[[], None]:
    """For inference: every wrapper with nothing to add (merged, or no adapter active) is replaced in
    its parent by the layer it wraps, so the model runs exactly as one that never had adapters (a
    wrapper's call costs about 3 us, 1-2 % of a small model's token on a CPU). ``layers``: the
    wrappers by path (default: found by walking the model); ``folded``: paths of wrappers whose
    adapters the caller adds some other way (they step aside too). Returns the function that puts
    them back; until it is called, code that looks for wrappers (attaching, removing, saving,
    merging through the model) must not run, so call both under the same lock."""
    swapped = []
    for path, layer in (lora_layers(model) if layers is None else layers).items():
        if layer.merged is not None or not layer.active or path in folded:
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, layer.base_layer)
            swapped.append((parent, child, layer))

    def restore() -> None:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)
        swapped.clear()

    return restore


def merge_adapters(model: nn.Module, layers: Iterable[LoraLayer] | None = None) -> None:
    """Fold the active mix into the base weights (zero extra latency); exact, undone by unmerge."""
    layers = _layers(model, layers)
    for layer in layers:  # check all before changing any, so a refusal leaves nothing half-merged
        if layer.active:
            layer._weight_param()
    for layer in layers:
        layer.merge()


def unmerge_adapters(model: nn.Module, layers: Iterable[LoraLayer] | None = None) -> None:
    for layer in _layers(model, layers):
        layer.unmerge()


def is_merged(model: nn.Module, layers: Iterable[LoraLayer] | None = None) -> bool:
    return any(layer.merged is not None for layer in _layers(model, layers))


def set_trainable(model: nn.Module, name: str | None) -> None:
    """Only adapter ``name``'s trainable parameters require grad (None: nothing does).
    Frozen-by-design tensors (LoRA-FA's A, VeRA's projections) stay frozen."""
    for param in model.parameters():
        param.requires_grad_(False)
    if name is None:
        return
    for adapter in adapter_modules(model, name).values():
        for pname, param in adapter.named_parameters():
            frozen = adapter.config.variant == "lora-fa" and pname.startswith("lora_A")
            param.requires_grad_(not frozen)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the numbers they encode."""
    trainable = total = 0
    seen = set()  # tied weights (embedding = output head) count once
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            n = param.numel()
            if type(module).__name__ == "Linear4bit" and param is getattr(module, "weight", None):
                n = module.in_features * module.out_features  # packed two per byte
            total += n
            trainable += n if param.requires_grad else 0
    return trainable, total

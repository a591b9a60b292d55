"""Adapters on disk in the layout peft, vLLM and TGI read, and merged-model export.

    adapter_config.json         {"peft_type": "LORA" | "VERA", "r", "lora_alpha", "target_modules", ...}
    adapter_model.safetensors   base_model.model.<layer path>.lora_A.weight     (r, in)
                                base_model.model.<layer path>.lora_B.weight     (out, r)
                                base_model.model.<layer path>.lora_magnitude_vector   (out,)  DoRA
                                base_model.model.<layer path>.vera_lambda_b / vera_lambda_d  VeRA
                                base_model.vera_A (r, max_in), base_model.vera_B (max_out, r) VeRA

Only safetensors are read (never pickles). Writes go to a temporary folder renamed into place, so a
crash never leaves a half-written adapter (``paths.atomic_folder``). Variants that peft knows as plain
LoRA (LoRA-FA, Delta-LoRA) are saved as such; our variant name travels in the safetensors metadata.
``base_model_name_or_path`` names the model the adapter was attached to (its ``name_or_path``, which
``models.load_model`` sets to what peft can load it from), else the one its LoraConfig names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lora_app.errors import AdapterLoadError

from lora_app.lora.adapters import VeraProjection
from lora_app.lora.config import LoraConfig
from lora_app.lora.layer import LoraLayer, unwrap
from lora_app.lora.model import adapter_config, adapter_modules, adapter_names, attach, lora_layers, set_active_adapters
from lora_app.lora.quant import dequantized_weight, is_conv1d, is_quantized, in_out_features
from lora_app.lora.targets import find_linear_modules, leaf_names, resolve_targets
from lora_app.paths import atomic_folder

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under their peft keys (contiguous fp32 CPU copies)."""
    state = {}
    modules = adapter_modules(model, name)
    for path, adapter in modules.items():
        for key, tensor in adapter.tensors().items():
            state[f"{PREFIX}{path}.{key}"] = tensor.detach().float().cpu().contiguous()
    projection = getattr(next(iter(modules.values())), "projection", None)
    if projection is not None:
        state["base_model.vera_A"] = projection.A.float().contiguous()
        state["base_model.vera_B"] = projection.B.float().contiguous()
    return state


def _peft_config(model: nn.Module, name: str, config: LoraConfig, paths: list[str]) -> dict:
    # Leaf names are what vLLM/TGI expect; fall back to full paths when leaves would select more layers.
    leaves = leaf_names(paths)
    targets = leaves if sorted(resolve_targets(model, leaves)) == sorted(paths) else sorted(paths)
    ranks = {path: lora_layers(model)[path].adapters[name].rank for path in paths}
    common = {
        "r": config.rank,
        "target_modules": targets,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or config.base_model_name_or_path,
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "inference_mode": True,
    }
    if any(rank != config.rank for rank in ranks.values()):  # layers loaded from a peft rank_pattern
        common["rank_pattern"] = {path: rank for path, rank in ranks.items() if rank != config.rank}
    if any(is_conv1d(lora_layers(model)[p].base_layer) for p in paths):
        common["fan_in_fan_out"] = True
    if config.variant == "vera":
        return {"peft_type": "VERA", **common, "projection_prng_key": config.vera_seed, "save_projection": True,
                "vera_dropout": config.dropout, "d_initial": config.vera_d_initial}
    return {"peft_type": "LORA", **common, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "use_rslora": config.variant == "rslora", "use_dora": config.variant == "dora"}


def save_adapter(model: nn.Module, name: str, folder: str | os.PathLike) -> Path:
    """Write adapter ``name`` as ``adapter_config.json`` + ``adapter_model.safetensors``."""
    config = adapter_config(model, name)
    paths = list(adapter_modules(model, name))
    state = adapter_state(model, name)
    peft_config = _peft_config(model, name, config, paths)
    metadata = {"format": "pt", "lora_app_variant": config.variant}

    def write(tmp: Path):
        save_file(state, tmp / WEIGHTS_NAME, metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")

    return atomic_folder(Path(folder), write)


def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config dict, tensors, safetensors metadata) of an adapter folder; refuses anything but safetensors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterLoadError(f"{folder} is not a folder.")
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        if pickles:
            raise AdapterLoadError(
                f"{folder} holds {', '.join(pickles)}: pickle files can run code when loaded, so only "
                f"{WEIGHTS_NAME} is accepted. Re-save the adapter with safetensors."
            )
        raise AdapterLoadError(f"{folder} has no {WEIGHTS_NAME}.")
    if not (folder / CONFIG_NAME).exists():
        raise AdapterLoadError(f"{folder} has no {CONFIG_NAME}.")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from err
    try:
        with safe_open(weights, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise AdapterLoadError(f"{weights} is not a readable safetensors file: {err}") from err
    return config, tensors, metadata


def _config_from_peft(peft: dict, metadata: dict) -> LoraConfig:
    peft_type = peft.get("peft_type")
    if peft_type not in ("LORA", "VERA"):
        raise AdapterLoadError(f"adapter type {peft_type!r} is not supported (LORA and VERA are).", "unsupported")
    if peft.get("bias", "none") != "none" or peft.get("modules_to_save"):
        raise AdapterLoadError("adapters that also train biases or whole modules (modules_to_save) are not supported.",
                               "unsupported")
    common = dict(rank=int(peft["r"]), base_model_name_or_path=peft.get("base_model_name_or_path"))
    if peft_type == "VERA":
        return LoraConfig(variant="vera", alpha=1.0, dropout=float(peft.get("vera_dropout", 0.0)),
                          vera_seed=int(peft.get("projection_prng_key", 0)),
                          vera_d_initial=float(peft.get("d_initial", 0.1)), **common)
    variant = metadata.get("lora_app_variant")
    if variant not in ("lora", "lora-fa", "delta-lora"):
        variant = "dora" if peft.get("use_dora") else "rslora" if peft.get("use_rslora") else "lora"
    return LoraConfig(variant=variant, alpha=float(peft.get("lora_alpha", 8)),
                      dropout=float(peft.get("lora_dropout", 0.0)), **common)


def _layer_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group peft keys by layer path: {path: {"lora_A.weight": ..., ...}}; accepts the
    ``.<adapter>.`` infix and ``.weight`` suffix variants that some writers use."""
    suffixes = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "vera_lambda_b", "vera_lambda_d")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key in ("base_model.vera_A", "base_model.vera_B"):
            continue
        body = key[len(PREFIX):] if key.startswith(PREFIX) else key
        body = body.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")
        for suffix in suffixes:
            if body.endswith("." + suffix):
                grouped.setdefault(body[: -len(suffix) - 1], {})[suffix] = tensor
                break
        else:
            raise AdapterLoadError(f"unexpected tensor {key!r} in the adapter (not a LoRA/DoRA/VeRA weight).",
                                   "unsupported")
    return grouped


def _check_shapes(model: nn.Module, config: LoraConfig, grouped: dict) -> dict[str, tuple[int, int]]:
    """Every tensor must fit its layer; returns (in, out) per layer path. The error names the first
    tensor that does not fit, which is how an adapter for another base model shows itself."""
    linear = {path: unwrap(m) for path, m in find_linear_modules(model).items()}
    unknown = [path for path in grouped if path not in linear]
    if unknown:
        raise AdapterLoadError(
            f"the adapter has weights for {unknown[0]!r}, which this model does not have as a linear layer: "
            "it was trained for another base model.", "base"
        )
    dims = {}
    for path in (p for p in linear if p in grouped):  # model order, so "first mismatch" means something
        parts = grouped[path]
        in_f, out_f = dims[path] = in_out_features(linear[path])
        if config.variant == "vera":
            expected = {"vera_lambda_b": (out_f,), "vera_lambda_d": (config.rank,)}
        else:  # the rank follows the tensors: peft's rank_pattern gives layers different ranks
            rank = parts["lora_A.weight"].shape[0] if "lora_A.weight" in parts else config.rank
            expected = {"lora_A.weight": (rank, in_f), "lora_B.weight": (out_f, rank)}
            if config.variant == "dora":
                expected["lora_magnitude_vector"] = (out_f,)
        for key, shape in expected.items():
            if key not in parts:
                raise AdapterLoadError(f"the adapter is missing {PREFIX}{path}.{key}.", "base")
            if tuple(parts[key].shape) != shape:
                raise AdapterLoadError(
                    f"tensor {PREFIX}{path}.{key} has shape {tuple(parts[key].shape)} but this model needs "
                    f"{shape}: the adapter was trained for another base model.", "base"
                )
    return dims


def _vera_projection(config: LoraConfig, tensors: dict, dims: dict) -> VeraProjection:
    max_in = max(d[0] for d in dims.values())
    max_out = max(d[1] for d in dims.values())
    A, B = tensors.get("base_model.vera_A"), tensors.get("base_model.vera_B")
    if (A is None) != (B is None) or (A is not None and (
            A.shape[0] != config.rank or A.shape[1] < max_in or B.shape[0] < max_out or B.shape[1] != config.rank)):
        raise AdapterLoadError(
            f"the VeRA projections (vera_A {None if A is None else tuple(A.shape)}, vera_B "
            f"{None if B is None else tuple(B.shape)}) do not fit this model: it needs r={config.rank}, "
            f"in >= {max_in}, out >= {max_out}.", "base"
        )
    return VeraProjection(config.rank, max_in, max_out, seed=config.vera_seed, A=A, B=B)


def load_adapter(model: nn.Module, folder: str | os.PathLike, name: str = "default", activate: bool = True) -> LoraConfig:
    """Attach the adapter saved in ``folder`` as ``name``. Everything is checked before the model
    is touched: on any error the model is exactly as it was."""
    peft, tensors, metadata = read_adapter(folder)
    config = _config_from_peft(peft, metadata)
    grouped = _layer_tensors(tensors)
    if not grouped:
        raise AdapterLoadError(f"{folder} holds no adapter weights.")
    if name in adapter_names(model):
        raise AdapterLoadError(f"the model already has an adapter named {name!r}; pick another name.", "name")
    dims = _check_shapes(model, config, grouped)
    if config.variant == "vera":
        attach(model, config, name, list(grouped), _vera_projection(config, tensors, dims))
    else:  # one group per rank, each with its own scaling alpha / rank
        by_rank: dict[int, list[str]] = {}
        for path, parts in grouped.items():
            by_rank.setdefault(parts["lora_A.weight"].shape[0], []).append(path)
        for rank, paths in by_rank.items():
            config = LoraConfig(**{**config.to_dict(), "rank": rank})
            attach(model, config, name, paths)
    for path, adapter in adapter_modules(model, name).items():
        adapter.load_tensors(grouped[path])
    if activate:
        set_active_adapters(model, name)
    return config


# ----------------------------------------------------------------------------------- export
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights with the active adapters folded in and every quantized layer
    dequantized, under the original (unwrapped) names: a plain full-precision checkpoint."""
    state: dict[str, torch.Tensor] = {}
    skip_under: list[str] = []
    for path, module in model.named_modules():
        if any(path == s or path.startswith(s + ".") for s in skip_under):
            continue
        prefix = f"{path}." if path else ""
        if isinstance(module, LoraLayer) or is_quantized(module):
            base = module.base_layer if isinstance(module, LoraLayer) else module
            if isinstance(module, LoraLayer) and module.merged is None and module.active:
                weight = module.merged_weight()
            else:  # unmerged and inactive, or already merged in place: the base weight is the answer
                weight = dequantized_weight(base).float()
            weight = weight.T if is_conv1d(base) else weight
            state[prefix + "weight"] = weight.to(dtype or _float_dtype(model))
            if getattr(base, "bias", None) is not None:
                state[prefix + "bias"] = base.bias.detach().to(dtype or _float_dtype(model))
            skip_under.append(path)
            continue
        for pname, param in module.named_parameters(recurse=False):
            state[prefix + pname] = param.detach().to(dtype) if dtype and param.is_floating_point() else param.detach()
        for bname, buf in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                state[prefix + bname] = buf.detach()
    _drop_shared(state)  # tied embeddings: one tensor, saved once; transformers re-ties on load
    return {k: v.cpu().contiguous() for k, v in state.items()}


def _float_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def export_merged(model: nn.Module, folder: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Save the model with its active adapters merged as a normal Hugging Face folder
    (config.json + model.safetensors [+ tokenizer]) that plain transformers loads."""
    state = merged_state_dict(model, dtype)
    config = model.config

    def write(tmp: Path):
        clean = config.__class__.from_dict(config.to_dict())
        if hasattr(clean, "quantization_config"):
            del clean.quantization_config
        clean.dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
        clean.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_folder(Path(folder), write)


def _drop_shared(state: dict[str, torch.Tensor]) -> None:
    """safetensors refuses two names for one storage: keep the first name of each."""
    seen = set()
    for key in list(state):
        ident = (state[key].data_ptr(), tuple(state[key].shape))
        if ident in seen and state[key].numel() > 0:
            del state[key]
        seen.add(ident)

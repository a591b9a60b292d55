"""Which layers get adapters: module names, a regex, ``all-linear``, or the architecture's defaults."""

from __future__ import annotations

import re

from torch import nn

from lora_app.errors import TargetError

from lora_app.lora.layer import LoraLayer
from lora_app.lora.quant import is_linear_like

# Attention and MLP projections: adapting all of them is what QLoRA found to match full fine-tuning.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
for _family in ("mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "smollm3", "granite"):
    DEFAULT_TARGETS[_family] = DEFAULT_TARGETS["llama"]


def find_linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable layer by full path (an already wrapped layer counts as its base)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            found[name] = module
        elif is_linear_like(module) and not name.endswith(".base_layer") and not _inside_adapter(name):
            found[name] = module
    return found


def _inside_adapter(name: str) -> bool:
    return ".adapters." in name


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head} | {"lm_head"}


def leaf_names(names) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def resolve_targets(model: nn.Module, targets: str | list[str] | None) -> list[str]:
    """Full paths of the layers that ``targets`` selects, in model order."""
    linear = find_linear_modules(model)
    heads = _output_head_names(model)
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = DEFAULT_TARGETS.get(model_type, "all-linear")
    if isinstance(targets, str) and targets.strip() == "all-linear":
        chosen = [name for name in linear if name not in heads]
    elif isinstance(targets, str) and re.search(r"[\\^$*+?()\[\]{}|]", targets):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise TargetError(f"targets {targets!r} is not a valid regular expression: {err}") from err
        chosen = [name for name in linear if pattern.fullmatch(name)]
    else:
        wanted = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
        wanted = [t for t in wanted if t]
        chosen = [name for name in linear if any(name == t or name.endswith("." + t) for t in wanted)]
        unknown = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linear)]
        if unknown and chosen:
            raise TargetError(
                f"target module(s) {', '.join(unknown)} not found; this model's linear modules are: "
                f"{', '.join(leaf_names(linear))}."
            )
    if not chosen:
        raise TargetError(
            f"targets {targets!r} match no linear layer of this model. Its linear modules are: "
            f"{', '.join(leaf_names(linear))} (or use 'all-linear')."
        )
    return chosen

"""LoRA+: B learns faster than A. Optimizer parameter groups with B (and DoRA's magnitude, and
VeRA's lambda_b, which sit on the output side like B) at ``lr * ratio`` and A at ``lr``."""

from __future__ import annotations

from torch import nn

from lora_app.lora.model import adapter_modules

OUTPUT_SIDE = ("lora_B", "lora_magnitude_vector", "vera_lambda_b")


def param_groups(model: nn.Module, name: str, lr: float, lora_plus_ratio: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Groups of adapter ``name``'s trainable parameters for any torch optimizer.

    Without a ratio (or ratio 1) it is one group at ``lr``. The LoRA+ paper suggests ratios of 2-16.
    """
    if lora_plus_ratio is not None and lora_plus_ratio <= 0:
        raise ValueError(f"the LoRA+ ratio must be > 0 (got {lora_plus_ratio}).")
    slow, fast = [], []
    for adapter in adapter_modules(model, name).values():
        for pname, param in adapter.named_parameters():
            if param.requires_grad:
                (fast if pname.startswith(OUTPUT_SIDE) else slow).append(param)
    ratio = lora_plus_ratio or 1.0
    if ratio == 1.0:
        return [{"params": slow + fast, "lr": lr, "weight_decay": weight_decay}]
    groups = [{"params": slow, "lr": lr, "weight_decay": weight_decay},
              {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]

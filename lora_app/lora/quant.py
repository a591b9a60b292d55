"""The few facts the core needs about base layers: shapes, orientation and a float view of the weight.

Supports ``nn.Linear``, transformers' ``Conv1D`` (GPT-2 family: weight stored as (in, out)) and
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (recognised by class name, so that neither
transformers nor bitsandbytes is imported here unless a quantized weight must be dequantized).
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt")


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ in QUANTIZED_CLASSES


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight as a float (out, in) matrix; a view where possible, a new tensor for 4/8-bit."""
    name = type(module).__name__
    if name == "Linear4bit":
        weight = dequantize_4bit(module, dtype or module.weight.quant_state.dtype)
    elif name == "Linear8bitLt":
        # only a quantized base needs bitsandbytes, whose import warns about missing kernels on a CPU
        import bitsandbytes.functional as bnbF

        scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
        weight = bnbF.int8_vectorwise_dequant(module.weight.data, scb)
    elif is_conv1d(module):
        weight = module.weight.T
    else:
        weight = module.weight
    return weight if dtype is None else weight.to(dtype)


def dequantize_4bit(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes ``Linear4bit`` in ``dtype``. With double quantization
    bitsandbytes dequantizes the per-block scales again at every call; here that happens once per layer
    (``module.lora_absmax``, fp32: 4 bytes per 64 weights, 0.06 bytes a weight more), which is what the
    training step's 4-bit node (``training/fused.py``) calls twice a step. The ops are bitsandbytes'
    own, registered with torch when a ``Linear4bit`` was built."""
    state = module.weight.quant_state
    absmax = getattr(module, "lora_absmax", None)
    if absmax is None:
        absmax = state.absmax
        if state.nested:  # what bitsandbytes' own dequantization computes, once
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32
            ) + state.offset
        module.lora_absmax = absmax
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        module.weight.data.view(-1, 1), absmax, state.blocksize, state.quant_type, state.shape, dtype)

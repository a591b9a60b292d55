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
    training step's 4-bit node (``Linear4bitFunction``) calls twice a step. The ops are bitsandbytes'
    own, registered with torch when a ``Linear4bit`` was built."""
    state = module.weight.quant_state
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        module.weight.data.view(-1, 1), _absmax(module), state.blocksize, state.quant_type, state.shape, dtype)


def _absmax(module: nn.Module) -> torch.Tensor:
    """A ``Linear4bit``'s per-block scales in fp32, dequantized once where they are double-quantized."""
    absmax = getattr(module, "lora_absmax", None)
    if absmax is None:
        state = module.weight.quant_state
        absmax = state.absmax
        if state.nested:  # what bitsandbytes' own dequantization computes, once
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32
            ) + state.offset
        module.lora_absmax = absmax
    return absmax


class Packed4bit:
    """The 4-bit weights of layers that read one input (q, k and v, say) moved side by side, so that
    one dequantization gives their weights stacked by rows. Each layer's weight and scales become views
    of the shared ones: no memory is added, and each layer alone computes as before."""

    def __init__(self, modules: list[nn.Module]):
        states = [module.weight.quant_state for module in modules]
        self.blocksize, self.quant_type = states[0].blocksize, states[0].quant_type
        self.shape = (sum(state.shape[0] for state in states), states[0].shape[1])
        with torch.no_grad():
            self.data = torch.cat([module.weight.data.reshape(-1) for module in modules])
            self.absmax = torch.cat([_absmax(module) for module in modules])
        packed, scales = 0, 0
        for module in modules:
            n, blocks = module.weight.data.numel(), module.lora_absmax.numel()
            module.weight.data = self.data[packed:packed + n].view(module.weight.data.shape)
            module.lora_absmax = self.absmax[scales:scales + blocks]
            packed, scales = packed + n, scales + blocks

    @staticmethod
    def fits(modules: list[nn.Module]) -> bool:
        """Whether the layers are 4-bit of one kind, with no quantization block across two of them."""
        states = [getattr(getattr(module, "weight", None), "quant_state", None) for module in modules]
        return type(modules[0]).__name__ == "Linear4bit" and None not in states \
            and len({(state.blocksize, state.quant_type, state.shape[1]) for state in states}) == 1 \
            and all(state.shape[0] * state.shape[1] % state.blocksize == 0 for state in states) \
            and len({type(module) for module in modules}) == 1

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            self.data.view(-1, 1), self.absmax, self.blocksize, self.quant_type, self.shape, dtype)


class Linear4bitFunction(torch.autograd.Function):
    """``x W^T + b`` for a frozen 4-bit weight W, dequantized by ``dequantize(dtype)`` for the product
    and again for x's gradient. bitsandbytes' own forward runs four Python layers and, with double
    quantization, dequantizes the per-block scales again at every call, forward and backward: on a GPU,
    where a step is bound by how fast the CPU issues kernels, QLoRA paid for it in speed (5,993 -> 8,359
    useful tokens/s on an H200 with this node and the rebuilt inputs of ``training/fused.py``)."""

    @staticmethod
    def forward(ctx, x, dequantize, bias):
        ctx.dequantize = dequantize  # the weight is a parameter: nothing for the node to keep
        return nn.functional.linear(x, dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad @ ctx.dequantize(grad.dtype), None, grad_bias


def linear_4bit(x: torch.Tensor, dequantize, compute_dtype: torch.dtype | None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``Linear4bitFunction`` in the dtype a ``Linear4bit`` computes in (its ``compute_dtype``, else
    x's), returned in x's."""
    dtype = compute_dtype or x.dtype
    bias = None if bias is None else bias.to(dtype)
    return Linear4bitFunction.apply(x.to(dtype), dequantize, bias).to(x.dtype)

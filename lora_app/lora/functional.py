"""The training step of plain LoRA as one autograd node:

    y = base_out + (dropout(x) A^T s) B^T

Written with autograd's own ops, one LoRA layer records about eight nodes (casts, dropout, two
products, the scaling, the add) and keeps ``dropout(x)`` for A's gradient in the adapter's dtype:
on a bf16 model, an fp32 copy of every layer input. Here it is one node that keeps the input as it
came (the same tensor the other projections of that input keep), the dropout's boolean mask and the
r-wide ``h = dropout(x) A^T s``; the backward pass rebuilds ``dropout(x)`` from them:

    dB = g^T h        dh = g B s        dA = dh^T dropout(x)        dx = (dh A) * keep / (1 - p)

(``dx`` of the base layer is added by the base layer's own backward). On a GPU, where a step of a
small model is bound by how fast the CPU issues kernels, fewer nodes is most of the win; everywhere,
the input copies were most of the adapter's activation memory.
"""

from __future__ import annotations

import torch

# Dropout's probability in steps of 1/32768: the CPU draws its mask as 15-bit integers (see dropout).
DROPOUT_STEPS = 32768


def dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Inverted dropout: ``(x * keep / (1 - p), keep, 1 / (1 - p))`` with ``keep`` a boolean mask that
    keeps each element with probability 1 - p.

    On a GPU one fused kernel does it all. On a CPU torch's own mask (``bernoulli_``) costs more than
    an adapter's matmuls, so one 64-bit draw gives four elements' 15 bits (its four 16-bit pieces, the
    sign bit cleared): 2.3x cheaper (2-core AVX2 EPYC), with p rounded to a multiple of 1/32768
    (0.05 -> 0.050018).
    """
    if x.device.type == "cuda":
        dropped, keep = torch.native_dropout(x, p, True)
        return dropped, keep, 1.0 / (1.0 - p)
    threshold = round(p * DROPOUT_STEPS)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_().view(torch.int16)[:n]
    keep = (bits.bitwise_and_(0x7FFF) >= threshold).view(x.shape)
    scale = DROPOUT_STEPS / (DROPOUT_STEPS - threshold)
    return (x * keep).mul_(scale), keep, scale


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What the adapter's products run in: autocast's dtype where it is on (as ``nn.Linear`` would),
    else the adapter's own (an fp32 adapter on a bf16 model computes in fp32)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class LoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, x, lora_A, lora_B, scaling: float, p: float):
        dtype = compute_dtype(x, lora_A)
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        dropped, mask, keep_scale = (x2.to(dtype), None, 1.0) if p == 0 else dropout(x2.to(dtype), p)
        with torch.autocast(x.device.type, enabled=False):
            h = (dropped @ a.T).mul_(scaling)
            out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]).to(dtype), h, b.T)
        ctx.save_for_backward(x, mask, h, lora_A, lora_B)
        ctx.scaling, ctx.keep_scale, ctx.dtype, ctx.out_dtype = scaling, keep_scale, dtype, base_out.dtype
        return out.to(base_out.dtype).view(base_out.shape)

    @staticmethod
    def backward(ctx, grad):
        x, mask, h, lora_A, lora_B = ctx.saved_tensors
        dtype = ctx.dtype
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_x = grad_a = grad_b = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[3]:
                grad_b = (g.T @ h).to(lora_B.dtype)
            dh = (g @ lora_B.to(dtype)).mul_(ctx.scaling)
            if ctx.needs_input_grad[2]:
                dropped = x.reshape(-1, x.shape[-1]).to(dtype)
                if mask is not None:
                    dropped = (dropped * mask).mul_(ctx.keep_scale)
                grad_a = (dh.T @ dropped).to(lora_A.dtype)
            if ctx.needs_input_grad[1]:
                grad_x = dh @ lora_A.to(dtype)
                if mask is not None:
                    grad_x = (grad_x * mask).mul_(ctx.keep_scale)
                grad_x = grad_x.to(x.dtype).view(x.shape)
        return grad if ctx.needs_input_grad[0] else None, grad_x, grad_a, grad_b, None, None


def lora_forward(base_out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float, p: float) -> torch.Tensor:
    """``base_out + s * B A dropout_p(x)`` as one autograd node (see the module docstring)."""
    return LoraFunction.apply(base_out, x, lora_A, lora_B, scaling, p)

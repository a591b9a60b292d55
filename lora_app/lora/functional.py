"""The training step of plain LoRA as one autograd node:

    y = base_out + (dropout(x) A^T s) B^T

Written with autograd's own ops, one LoRA layer records about eight nodes (casts, dropout, two
products, the scaling, the add) and keeps ``dropout(x)`` for A's gradient in the adapter's dtype:
on a bf16 model, an fp32 copy of every layer input. Here it is one node that keeps the input as it
came (the same tensor the other projections of that input keep), the random generator's state
before the dropout mask was drawn (the backward pass draws the same mask again rather than keeping
a byte per element) and the r-wide ``h = dropout(x) A^T s``:

    dB = g^T h        dh = g B s        dA = dh^T dropout(x)        dx = (dh A) * keep / (1 - p)

(``dx`` of the base layer is added by the base layer's own backward). On a GPU, where a step of a
small model is bound by how fast the CPU issues kernels, fewer nodes is most of the win; everywhere,
the input copies were most of the adapter's activation memory.
"""

from __future__ import annotations

import torch

# Dropout's probability in steps of 1/32768: the CPU draws its mask as 15-bit integers (see keep_mask).
DROPOUT_STEPS = 32768


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A boolean mask of ``x``'s shape keeping each element with probability 1 - p, and the factor
    1 / (1 - p) that keeps the expectation. It depends only on the shape and the generator's state,
    so the same state draws the same mask again.

    On a CPU torch's ``bernoulli_`` costs more than an adapter's matmuls, so one 64-bit draw gives
    four elements' 15 bits (its four 16-bit pieces, the sign bit cleared): 2.3x cheaper (2-core AVX2
    EPYC), with p rounded to a multiple of 1/32768 (0.05 -> 0.050018).
    """
    if x.device.type != "cpu":
        return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p), 1.0 / (1.0 - p)
    threshold = round(p * DROPOUT_STEPS)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n]
    return (bits.bitwise_and_(0x7FFF) >= threshold).view(x.shape), DROPOUT_STEPS / (DROPOUT_STEPS - threshold)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout, ``x * keep / (1 - p)``, with ``keep_mask``'s mask."""
    keep, scale = keep_mask(x, p)
    return (x * keep).mul_(scale)


def rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator that draws on ``device``."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def redraw_mask(state: torch.Tensor, x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """``keep_mask(x, p)`` as it was drawn from ``state``; the generator's own state is left as it is."""
    cuda = x.device.type == "cuda"
    with torch.random.fork_rng(devices=[x.device] if cuda else [], device_type=x.device.type):
        if cuda:
            torch.cuda.set_rng_state(state, x.device)
        else:
            torch.set_rng_state(state)
        return keep_mask(x, p)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What the adapter's products run in: autocast's dtype where it is on (as ``nn.Linear`` would),
    else the adapter's own (an fp32 adapter on a bf16 model computes in fp32)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class LoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, x, lora_A, lora_B, scaling: float, p: float, gate=None, up=None):
        dtype = compute_dtype(x, lora_A)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        ctx.rng = rng_state(x.device) if p > 0 else None
        dropped = dropout(x2, p) if p > 0 else x2
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            h = (dropped @ a.T).mul_(scaling)
            out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]).to(dtype), h, b.T)
        # x = silu(gate) * up can be computed again from tensors the MLP keeps anyway
        ctx.save_for_backward(*((gate, up) if gate is not None else (x, None)), h, lora_A, lora_B)
        ctx.scaling, ctx.p, ctx.dtype, ctx.x_shape, ctx.x_dtype = scaling, p, dtype, x.shape, x.dtype
        return out.to(base_out.dtype).view(base_out.shape)

    @staticmethod
    def backward(ctx, grad):
        x, up, h, lora_A, lora_B = ctx.saved_tensors
        if up is not None:
            x = torch.nn.functional.silu(x) * up  # as the MLP computed it (training.fused.SiluMulFunction)
        dtype = ctx.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        keep, keep_scale = redraw_mask(ctx.rng, x2, ctx.p) if ctx.p > 0 else (None, 1.0)
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_x = grad_a = grad_b = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[3]:
                grad_b = (g.T @ h).to(lora_B.dtype)
            dh = (g @ lora_B.to(dtype)).mul_(ctx.scaling)
            if ctx.needs_input_grad[2]:
                dropped = x2 if keep is None else (x2 * keep).mul_(keep_scale)
                grad_a = (dh.T @ dropped).to(lora_A.dtype)
            if ctx.needs_input_grad[1]:
                grad_x = dh @ lora_A.to(dtype)
                if keep is not None:
                    grad_x = (grad_x * keep).mul_(keep_scale)
                grad_x = grad_x.to(ctx.x_dtype).view(ctx.x_shape)
        return grad if ctx.needs_input_grad[0] else None, grad_x, grad_a, grad_b, None, None, None, None


def lora_forward(base_out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float, p: float, rebuild: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``base_out + s * B A dropout_p(x)`` as one autograd node (see the module docstring).

    ``rebuild = (gate, up)``: x is ``silu(gate) * up`` (a gated MLP's down projection), and the node keeps
    those two, which the MLP keeps anyway, instead of x, an intermediate-size vector per token."""
    return LoraFunction.apply(base_out, x, lora_A, lora_B, scaling, p, *(rebuild or (None, None)))

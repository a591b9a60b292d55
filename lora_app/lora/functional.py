"""The training step of plain LoRA as one autograd node:

    y = base_out + (dropout(x) A^T s) B^T

Written with autograd's own ops, one LoRA layer records about eight nodes (casts, dropout, two
products, the scaling, the add) and keeps ``dropout(x)`` for A's gradient in the adapter's dtype:
on a bf16 model, an fp32 copy of every layer input. Here it is one node that keeps the input as it
came (the same tensor the other projections of that input keep), the seed its dropout mask was drawn
from (the backward pass draws the same mask again rather than keeping a byte per element), A and B
in the dtype the products ran in, and the r-wide ``h = dropout(x) A^T s``:

    dB = g^T h        dh = g B s        dA = dh^T dropout(x)        dx = (dh A) * keep / (1 - p)

(``dx`` of the base layer is added by the base layer's own backward). On a GPU, where a step of a
small model is bound by how fast the CPU issues kernels, fewer nodes and fewer Python calls per node
are most of the win; everywhere, the input copies were most of the adapter's activation memory.

Where x can be computed again from tensors autograd keeps anyway (``Rebuild``: a norm's input and its
per-row scale, a gated MLP's gate and up), the node keeps those instead of x, and the layers that
share x share one recomputation.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import torch

# Dropout's probability in steps of 1/32768: the CPU draws its mask as 15-bit integers (see keep_mask).
DROPOUT_STEPS = 32768


def keep_mask(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """A boolean mask of ``x``'s shape keeping each element with probability 1 - p, and the factor
    1 / (1 - p) that keeps the expectation. It depends only on the shape and the generator's state
    (torch's global one unless ``generator`` is given), so the same state draws the same mask again.

    On a CPU torch's ``bernoulli_`` costs more than an adapter's matmuls, so one 64-bit draw gives
    four elements' 15 bits (its four 16-bit pieces, the sign bit cleared): 2.3x cheaper (2-core AVX2
    EPYC), with p rounded to a multiple of 1/32768 (0.05 -> 0.050018).
    """
    if x.device.type != "cpu":
        return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p, generator=generator), \
            1.0 / (1.0 - p)
    threshold = round(p * DROPOUT_STEPS)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(generator=generator).view(torch.int16)[:n]
    return (bits.bitwise_and_(0x7FFF) >= threshold).view(x.shape), DROPOUT_STEPS / (DROPOUT_STEPS - threshold)


def dropout(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout, ``x * keep / (1 - p)``, with ``keep_mask``'s mask."""
    keep, scale = keep_mask(x, p, generator)
    return (x * keep).mul_(scale)


def new_seed() -> int:
    """A seed for one dropout mask, from torch's global generator: ``torch.manual_seed`` repeats a run's
    masks, and checkpointing, which restores that generator before it recomputes a layer, draws the
    same ones again."""
    return int(torch.randint(2**62, (), dtype=torch.int64))


_local = threading.local()  # a training thread and the chat's never share a generator


def mask_generator(device: torch.device, seed: int) -> torch.Generator:
    """This thread's generator for ``device``, seeded with ``seed``. Seeding again is how the backward pass
    draws a mask again: saving and restoring the global generator's state (``torch.random.fork_rng``)
    cost 65 us a call on a 2-core EPYC, seeding 9."""
    generators = _local.__dict__.setdefault("generators", {})
    if device not in generators:
        generators[device] = torch.Generator(device)
    return generators[device].manual_seed(seed)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What the adapter's products run in: autocast's dtype where it is on (as ``nn.Linear`` would),
    else the adapter's own (an fp32 adapter on a bf16 model computes in fp32)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class Rebuild:
    """How to compute a tensor again from tensors that autograd keeps anyway: ``fn(*tensors)``.

    Its producer attaches it to the tensor (``attach``); an adapter that gets that tensor as its input
    then keeps ``tensors`` (through ``save_for_backward``, so checkpointing and other saved-tensor hooks
    see them) rather than the input. Only ``fn`` and a shared cache ride along on the adapter's node:
    the first backward pass among the input's users (q, k and v, say) computes it, the last one drops it.
    """

    ATTRIBUTE = "lora_rebuild"

    def __init__(self, fn, *tensors: torch.Tensor):
        self.fn, self.tensors = fn, tensors
        self.cache = _Shared()

    def attach(self, tensor: torch.Tensor) -> torch.Tensor:
        self.version = tensor._version
        setattr(tensor, self.ATTRIBUTE, self)
        return tensor

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "Rebuild | None":
        """The tensor's Rebuild, unless the tensor was changed in place since (then x is kept)."""
        rebuild = getattr(tensor, cls.ATTRIBUTE, None)
        return rebuild if rebuild is not None and rebuild.version == tensor._version else None


class _Shared:
    """The rebuilt tensor while some of its users have yet to run their backward pass."""

    def __init__(self):
        self.users, self.value = 0, None

    def take(self, fn, tensors):
        if self.value is None:
            self.value = fn(*tensors)
        value, self.users = self.value, self.users - 1
        if self.users <= 0:
            self.value = None
        return value


class LoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, x, lora_A, lora_B, scaling: float, p: float, rebuild: Rebuild | None = None):
        # every operand is cast to ``dtype``, which is autocast's where it is on: autocast changes nothing
        dtype = compute_dtype(x, lora_A)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        ctx.seed = new_seed() if p > 0 else None
        dropped = dropout(x2, p, mask_generator(x.device, ctx.seed)) if p > 0 else x2
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        h = (dropped @ a.T).mul_(scaling)
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]).to(dtype), h, b.T)
        kept = (x,) if rebuild is None else rebuild.tensors
        ctx.save_for_backward(*kept, h, a, b)  # a and b as cast: the backward pass casts nothing again
        ctx.rebuild = None if rebuild is None else (rebuild.fn, rebuild.cache)
        if rebuild is not None:
            rebuild.cache.users += 1
        ctx.scaling, ctx.p, ctx.dtype, ctx.x_shape, ctx.x_dtype = scaling, p, dtype, x.shape, x.dtype
        ctx.factor_dtypes = lora_A.dtype, lora_B.dtype
        return out.to(base_out.dtype).view(base_out.shape)

    @staticmethod
    def backward(ctx, grad):
        *kept, h, a, b = ctx.saved_tensors
        if ctx.rebuild is None:
            (x,) = kept
        else:
            fn, cache = ctx.rebuild
            x = cache.take(fn, kept)
        dtype = ctx.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        keep, keep_scale = keep_mask(x2, ctx.p, mask_generator(x2.device, ctx.seed)) if ctx.p > 0 else (None, 1.0)
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_x = grad_a = grad_b = None
        device = grad.device.type
        # a backward pass run inside autocast must not cast these products again
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            if ctx.needs_input_grad[3]:
                grad_b = (g.T @ h).to(ctx.factor_dtypes[1])
            dh = (g @ b).mul_(ctx.scaling)
            if ctx.needs_input_grad[2]:
                dropped = x2 if keep is None else (x2 * keep).mul_(keep_scale)
                grad_a = (dh.T @ dropped).to(ctx.factor_dtypes[0])
            if ctx.needs_input_grad[1]:
                grad_x = dh @ a
                if keep is not None:
                    grad_x = (grad_x * keep).mul_(keep_scale)
                grad_x = grad_x.to(ctx.x_dtype).view(ctx.x_shape)
        return grad if ctx.needs_input_grad[0] else None, grad_x, grad_a, grad_b, None, None, None


def lora_forward(base_out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float, p: float) -> torch.Tensor:
    """``base_out + s * B A dropout_p(x)`` as one autograd node (see the module docstring); where x
    carries a ``Rebuild``, the node keeps what x is computed from instead of x."""
    return LoraFunction.apply(base_out, x, lora_A, lora_B, scaling, p, Rebuild.of(x))

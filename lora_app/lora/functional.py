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

Layers that read the same x (q, k and v; gate and up: ``lora.group``) run as one node of k adapters:
one dropout mask for all k (as peft's for a fused ``qkv_proj``), one product for their A's.

Where x can be computed again from tensors autograd keeps anyway (``Rebuild``: a norm's input and its
per-row scale, a gated MLP's gate and up), the node keeps those instead of x, and the layers that
share x share one recomputation.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

# Dropout's probability in steps of 1/65536: the CPU draws its mask as 16-bit integers (see keep_mask).
DROPOUT_STEPS = 65536


def keep_mask(shape: tuple[int, ...], device: torch.device, p: float,
              seed: int | None = None) -> tuple[torch.Tensor, float]:
    """A mask of ``shape`` on ``device``, 1 for each element kept (with probability 1 - p) and 0 for each
    dropped, and the factor 1 / (1 - p) that keeps the expectation. It depends only on the shape and
    ``seed`` (drawn from torch's global generator when None, see ``new_seed``), so the same seed draws
    the same mask again.

    The mask is uint8, not bool: on a CPU a bf16 tensor times a bool one runs 6.7x slower than times
    a uint8 one (1,029 against 154 us for 1.8 M elements, 2-core AVX512-BF16 EPYC). On a CPU each
    64-bit draw gives four elements their 16 bits, with p rounded to a multiple of 1/65536 (0.05 ->
    0.050003), and the draws come from numpy's SFC64 generator: a 1024 x 576 mask took 0.95 ms against
    1.75 ms from torch's Mersenne twister (``random_``), itself 2.3x cheaper than ``bernoulli_`` (2-core
    AVX2 EPYC); the backward pass draws every mask a second time.
    """
    seed = new_seed() if seed is None else seed
    device = torch.device(device)
    if device.type != "cpu":
        mask = torch.empty(shape, dtype=torch.uint8, device=device)
        return mask.bernoulli_(1 - p, generator=mask_generator(device, seed)), 1.0 / (1.0 - p)
    threshold = round(p * DROPOUT_STEPS)
    n = math.prod(shape)
    bits = torch.from_numpy(np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16))[:n]
    keep = (bits >= threshold - DROPOUT_STEPS // 2).view(torch.uint8)  # int16 runs from -32768
    return keep.view(shape), DROPOUT_STEPS / (DROPOUT_STEPS - threshold)


def dropout(x: torch.Tensor, p: float, seed: int | None = None) -> torch.Tensor:
    """Inverted dropout, ``x * keep / (1 - p)``, with ``keep_mask``'s mask."""
    keep, scale = keep_mask(x.shape, x.device, p, seed)
    return (x * keep).mul_(scale)


def new_seed() -> int:
    """A seed for one dropout mask, from this thread's ``seed_stream`` where one is open, else from
    torch's global generator: ``torch.manual_seed`` repeats a run's masks, and checkpointing, which
    restores that generator before it recomputes a layer, draws the same ones again."""
    return int(torch.randint(2**62, (), dtype=torch.int64, generator=getattr(_local, "stream", None)))


_local = threading.local()  # a training thread and the chat's never share a generator


@contextmanager
def seed_stream(seed: int):
    """Within it, this thread's masks draw their seeds from a generator seeded with ``seed``: threads
    training side by side (``training.lanes``) draw the same masks whichever runs first."""
    _local.stream = torch.Generator().manual_seed(seed)
    try:
        yield
    finally:
        _local.stream = None


def mask_generator(device: torch.device, seed: int) -> torch.Generator:
    """This thread's torch generator for ``device`` (a GPU's masks), seeded with ``seed``. Seeding again
    is how the backward pass draws a mask again: saving and restoring the global generator's state
    (``torch.random.fork_rng``) cost 65 us a call on a 2-core EPYC, seeding 9."""
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
    """k adapters that read the same x (one, or q, k and v, see ``lora.group``), as one node:

        out_i = base_i + s (dropout(x) A_i^T) B_i^T,    base = [base_1, ..., base_k] side by side

    The k adapters share one dropout mask, as the q, k and v parts of a fused ``qkv_proj`` share one in
    peft, and their A's are one product (A = [A_1; ...; A_k] stacked), as is x's gradient. The mask's
    1 / (1 - p) rides on ``s`` (applied to the r-wide product, not to a copy of x). The base outputs
    come as one tensor, so that their gradient goes back as one (to one product, where the group
    computes its base as one)."""

    @staticmethod
    def forward(ctx, x, base, scaling: float, p: float, rebuild: Rebuild | None, *factors):
        k = len(factors) // 2
        factors_a, factors_b = factors[:k], factors[k:]
        # every operand is cast to ``dtype``, which is autocast's where it is on: autocast changes nothing
        dtype = compute_dtype(x, factors_a[0])
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a = (torch.cat(factors_a) if k > 1 else factors_a[0]).to(dtype)  # (sum of ranks, in)
        b = [factor.to(dtype) for factor in factors_b]
        ctx.seed = new_seed() if p > 0 else None
        keep, keep_scale = _keep(x2, p, ctx.seed)
        h = ((x2 if keep is None else x2 * keep) @ a.T).mul_(scaling * keep_scale)
        ranks, widths = [factor.shape[0] for factor in factors_a], [factor.shape[0] for factor in factors_b]
        bases = base.reshape(-1, base.shape[-1]).to(dtype).split(widths, dim=1)
        outs = tuple(torch.addmm(base_i, h_i, b_i.T).to(base.dtype).view(*base.shape[:-1], width)
                     for base_i, h_i, b_i, width in zip(bases, h.split(ranks, dim=1), b, widths))
        kept = (x,) if rebuild is None else rebuild.tensors
        ctx.save_for_backward(*kept, h, a, *b)  # a and b as cast: the backward pass casts nothing again
        ctx.rebuild = None if rebuild is None else (rebuild.fn, rebuild.cache)
        if rebuild is not None:
            rebuild.cache.users += 1
        ctx.scaling, ctx.p, ctx.dtype, ctx.x_shape, ctx.x_dtype = scaling, p, dtype, x.shape, x.dtype
        ctx.ranks, ctx.factor_dtypes = ranks, (factors_a[0].dtype, factors_b[0].dtype)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        k = len(grads)
        saved = ctx.saved_tensors  # once: checkpointing unpacks each saved tensor once
        *kept, h, a = saved[:-k]
        b = saved[-k:]
        if ctx.rebuild is None:
            (x,) = kept
        else:
            fn, cache = ctx.rebuild
            x = cache.take(fn, kept)
        x2 = x.reshape(-1, x.shape[-1]).to(ctx.dtype)
        gs = [g.reshape(-1, g.shape[-1]).to(ctx.dtype) for g in grads]
        needs = ctx.needs_input_grad[5:]  # A's, B's
        grad_x, grad_a, grad_b = None, [None] * k, [None] * k
        device = x2.device.type
        # a backward pass run inside autocast must not cast these products again
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            for i, h_i in enumerate(h.split(ctx.ranks, dim=1)):
                if needs[k + i]:
                    grad_b[i] = (gs[i].T @ h_i).to(ctx.factor_dtypes[1])
            keep, keep_scale = _keep(x2, ctx.p, ctx.seed)
            dh = torch.cat([g @ b_i for g, b_i in zip(gs, b)], dim=1) if k > 1 else gs[0] @ b[0]
            dh.mul_(ctx.scaling * keep_scale)
            if any(needs[:k]):
                grad_a = list((dh.T @ (x2 if keep is None else x2 * keep)).to(ctx.factor_dtypes[0]).split(ctx.ranks))
            if ctx.needs_input_grad[0]:
                grad_x = dh @ a
                if keep is not None:  # where x was dropped, so is its gradient
                    grad_x.mul_(keep)
                grad_x = grad_x.to(ctx.x_dtype).view(ctx.x_shape)
        grad_base = None
        if ctx.needs_input_grad[1]:
            grad_base = torch.cat(grads, dim=-1) if k > 1 else grads[0]
        return grad_x, grad_base, None, None, None, *grad_a, *grad_b


def _keep(x2: torch.Tensor, p: float, seed: int | None) -> tuple[torch.Tensor | None, float]:
    """The mask for the rows ``x2`` (None where p is 0) drawn from ``seed``: the same one every time."""
    if p == 0:
        return None, 1.0
    return keep_mask(x2.shape, x2.device, p, seed)


def lora_forward_shared(base: torch.Tensor, x: torch.Tensor, factors_a, factors_b, scaling: float,
                        p: float) -> tuple[torch.Tensor, ...]:
    """``base_i + s * B_i A_i dropout_p(x)`` for k adapters on the same x (one dropout mask), ``base``
    their base outputs side by side, as one autograd node (see the module docstring); where x carries a
    ``Rebuild``, the node keeps what x is computed from instead of x."""
    return LoraFunction.apply(x, base, scaling, p, Rebuild.of(x), *factors_a, *factors_b)


def lora_forward(base_out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float, p: float) -> torch.Tensor:
    """One adapter's ``lora_forward_shared``."""
    return lora_forward_shared(base_out, x, (lora_A,), (lora_B,), scaling, p)[0]

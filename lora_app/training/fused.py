"""Two blocks of every Llama-style layer as one autograd node each, and a 4-bit projection as one
node (``lora.quant.Linear4bitFunction``), for training.

Written with autograd's own ops, transformers' RMSNorm keeps an fp32 copy of its input (2 hidden-size
vectors a token on a bf16 model) and its gated MLP keeps ``silu(gate)`` beside ``gate`` and ``up``
(intermediate-size vectors); each op is also a node that autograd records and a GPU kernel that the
CPU launches. Here

    rms_norm(x)    keeps x and one fp32 number a row:  dx = r (dn - n mean(dn n)),  n = x r,  dn = g w
    silu_mul(a, b) keeps a and b:                      da = g b s (1 + a (1 - s)),  db = g a s,  s = sigmoid(a)

and both outputs carry a ``Rebuild`` (``lora.functional``): the adapters they feed (q, k, v; gate and
up; down) compute their input again from what these nodes keep rather than keep it, three vectors a
token and layer less (two hidden-size, one intermediate-size).

``fuse(model)`` swaps these in where a module computes exactly what they do, checked on a random
input at swap time (Gemma's ``1 + weight`` norm, say, does not match and is left alone).
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from lora_app.lora.functional import Rebuild
from lora_app.lora.quant import dequantize_4bit, linear_4bit


def rms_norm(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' ``weight * (x * rstd)`` in its dtypes: the fused node's output, and its rebuild."""
    return weight * (x.float() * rstd).to(x.dtype)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.silu(a) * b


class RMSNormFunction(torch.autograd.Function):
    """Returns the normed x and the fp32 ``rstd`` of each row (no gradient flows through it)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        ctx.mark_non_differentiable(rstd)
        return rms_norm(x, rstd, weight), rstd

    @staticmethod
    def backward(ctx, grad, _):
        x, rstd, weight = ctx.saved_tensors
        n = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * n.to(x.dtype)).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        dn = (grad * weight).float()
        grad_x = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return silu_mul(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # exactly autograd's steps; torch's silu_backward computes in fp32 inside one kernel
        return torch.ops.aten.silu_backward(grad * b, a), grad * nn.functional.silu(a)


def _rms_norm_forward(self, hidden_states):
    normed, rstd = RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    return Rebuild(rms_norm, hidden_states, rstd, self.weight).attach(normed)


def _gated_mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(Rebuild(silu_mul, gate, up).attach(SiluMulFunction.apply(gate, up)))


def _linear_4bit_forward(self, x):
    if not (torch.is_grad_enabled() and x.requires_grad):  # generation, say: bitsandbytes' small-batch kernels
        return type(self).forward(self, x)
    return linear_4bit(x, functools.partial(dequantize_4bit, self), self.compute_dtype, self.bias)


KINDS = {_rms_norm_forward: "rms_norm", _gated_mlp_forward: "gated_mlp", _linear_4bit_forward: "linear_4bit"}


def _candidates(module: nn.Module):
    """The fused forward that could stand in for ``module``'s, or None."""
    if type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor) \
            and isinstance(getattr(module, "variance_epsilon", None), float):
        return _rms_norm_forward
    act = getattr(module, "act_fn", None)
    if all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj")) \
            and type(act).__name__ in ("SiLU", "SiLUActivation"):
        return _gated_mlp_forward
    if type(module).__name__ == "Linear4bit" and getattr(module.weight, "quant_state", None) is not None:
        return _linear_4bit_forward
    return None


def fuse(model: nn.Module) -> dict[str, int]:
    """Swap the fused forwards in wherever they compute exactly what the module computes; returns how
    many modules of each kind were swapped ({"rms_norm": 33, "gated_mlp": 16, "linear_4bit": 0}, say)."""
    swapped = dict.fromkeys(KINDS.values(), 0)
    # what the hidden states are in: a 4- or 8-bit projection's own weight is stored as integers
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    checked: dict[tuple, bool] = {}  # one check per module class is enough: a model's layers are alike
    for module in model.modules():
        fused = _candidates(module)
        if fused is None:
            continue
        key = (type(module), fused)
        if key not in checked:
            checked[key] = _same_output(module, fused, dtype)
        if checked[key]:
            module.forward = types.MethodType(fused, module)
            swapped[KINDS[fused]] += 1
    return swapped


def _same_output(module: nn.Module, fused, dtype: torch.dtype) -> bool:
    """Both forwards on a random input that requires a gradient (a 4-bit projection takes its own path
    only then), of 2048 rows for a 4-bit projection: on a GPU bitsandbytes computes up to 1536 rows with
    a kernel of its own, more as dequantize-then-multiply, as the fused node does at any size."""
    if fused is _linear_4bit_forward:
        shape = (2048, module.in_features)
    else:
        shape = (6, module.weight.shape[-1] if fused is _rms_norm_forward else module.gate_proj.in_features)
    device = next(t.device for t in module.parameters())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype).requires_grad_()
    was_training = module.training
    module.eval()  # no dropout: both forwards must see the same computation
    try:
        with torch.enable_grad():
            return torch.equal(module(x).detach(), fused(module, x).detach())
    except Exception:  # noqa: BLE001 - a module that does not fit the pattern keeps its own forward
        return False
    finally:
        module.train(was_training)

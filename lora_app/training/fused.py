"""Two blocks of every Llama-style layer as one autograd node each, for training.

Written with autograd's own ops, transformers' RMSNorm keeps an fp32 copy of its input (2 hidden-size
vectors a token on a bf16 model) and its gated MLP keeps ``silu(gate)`` beside ``gate`` and ``up``
(intermediate-size vectors); each op is also a node that autograd records and a GPU kernel that the
CPU launches. Here

    rms_norm(x)    keeps x and one fp32 number a row:  dx = r (dn - n mean(dn n)),  n = x r,  dn = g w
    silu_mul(a, b) keeps a and b:                      da = g b s (1 + a (1 - s)),  db = g a s,  s = sigmoid(a)

and the down projection's adapters compute their input ``silu_mul(a, b)`` again from those two rather
than keep it (``LoraLayer``'s ``rebuild``), one intermediate-size vector a token less.

``fuse(model)`` swaps these in where a module computes exactly what they do, checked on a random
input at swap time (Gemma's ``1 + weight`` norm, say, does not match and is left alone).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from lora_app.lora import LoraLayer


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
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
        return nn.functional.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # exactly autograd's steps; torch's silu_backward computes in fp32 inside one kernel
        return torch.ops.aten.silu_backward(grad * b, a), grad * nn.functional.silu(a)


def _rms_norm_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _gated_mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    hidden = SiluMulFunction.apply(gate, up)
    if isinstance(self.down_proj, LoraLayer):  # its adapters compute their input again from gate and up
        return self.down_proj(hidden, rebuild=(gate, up))
    return self.down_proj(hidden)


def _candidates(module: nn.Module):
    """The fused forward that could stand in for ``module``'s, or None."""
    if type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor) \
            and isinstance(getattr(module, "variance_epsilon", None), float):
        return _rms_norm_forward
    act = getattr(module, "act_fn", None)
    if all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj")) \
            and type(act).__name__ in ("SiLU", "SiLUActivation"):
        return _gated_mlp_forward
    return None


def fuse(model: nn.Module) -> dict[str, int]:
    """Swap the fused forwards in wherever they compute exactly what the module computes; returns how
    many modules of each kind were swapped ({"rms_norm": 33, "gated_mlp": 16}, say)."""
    swapped = {"rms_norm": 0, "gated_mlp": 0}
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
            swapped["rms_norm" if fused is _rms_norm_forward else "gated_mlp"] += 1
    return swapped


def _same_output(module: nn.Module, fused, dtype: torch.dtype) -> bool:
    width = module.weight.shape[-1] if fused is _rms_norm_forward else module.gate_proj.in_features
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(next(module.parameters()).device, dtype)
    was_training = module.training
    module.eval()  # no dropout: both forwards must see the same computation
    try:
        with torch.no_grad():
            return torch.equal(module(x), fused(module, x))
    except Exception:  # noqa: BLE001 - a module that does not fit the pattern keeps its own forward
        return False
    finally:
        module.train(was_training)

"""The wrapper that puts named adapters on one base layer.

    y = base(x) + sum_i w_i * delta_i(x)

over the active adapters i with mixing weights w_i (ranks and variants may differ). Switching the
active set only changes ``self.active``: base weights are never touched, nothing is reloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_app.lora.quant import dequantized_weight, in_out_features, is_conv1d, is_quantized


def unwrap(module: nn.Module) -> nn.Module:
    """The original layer, whether or not it carries adapters."""
    return module.base_layer if isinstance(module, LoraLayer) else module


class LoraLayer(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}
        # Set while merged: the weight as it was, so unmerge restores it bit for bit. Solving
        # W0 = (W - sum w D) / c instead would round, and in bf16 drift further with every switch.
        self.merged: torch.Tensor | None = None
        self.packed: tuple[torch.Tensor, torch.Tensor] | None = None  # (A^T, B^T), see pack()
        self.group = None  # a lora.group.SharedInput, set for training

    @property
    def weight(self):  # lets code that inspects `layer.weight` (e.g. dtype checks) keep working
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.group is not None and self.training and not (args or kwargs):
            out = self.group.output(self, x)
            if out is not None:
                return out
        result = self.base_layer(x, *args, **kwargs)
        if self.merged is not None or not self.active:
            return result
        if self.packed is not None and not self.training:
            a_t, b_t = self.packed
            if x.dtype == a_t.dtype == result.dtype:  # two kernels: a token on a GPU is bound by launches
                flat = torch.addmm(result.reshape(-1, result.shape[-1]), x.reshape(-1, x.shape[-1]) @ a_t, b_t)
                return flat.view(result.shape)
            rows = x.reshape(-1, x.shape[-1]).to(a_t.dtype)
            result.view(-1, result.shape[-1]).add_(rows @ a_t @ b_t)  # adds and casts in one kernel
            return result
        base_result, base_out = result, None
        for name, w in self.active.items():
            adapter = self.adapters[name]
            if getattr(adapter, "lora_magnitude_vector", None) is not None and base_out is None:
                bias = getattr(self.base_layer, "bias", None)  # DoRA rescales W0 x, without the bias
                base_out = (base_result if bias is None else base_result - bias).to(adapter.lora_A.weight.dtype)
            result = adapter.add_to(result, x, w, base_out, self)
        return result

    def pack(self) -> None:
        """For inference: the active mix as one low-rank pair, A = [A_1; A_2; ...] stacked and
        B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] side by side, so any mix costs two matmuls, like one
        adapter of the summed rank. Kept transposed, on a CPU in the adapters' dtype: without native
        bf16 that runs one token's two products about 2.7x faster than bf16 factors (``x @ A^T @ B^T``
        reading both in order); on a GPU in the base's, so that the pair adds two kernels to a layer,
        not five with the casts. Not done where a variant is not of that form (DoRA, VeRA).
        Whatever changes the adapters or the mix drops the pack (``lora.model``); training never packs."""
        pairs = [self.adapters[name].factors() for name in self.active]
        if not pairs or any(pair is None for pair in pairs):
            self.packed = None
            return
        with torch.no_grad():
            a = torch.cat([factor_a for factor_a, _ in pairs])
            b = torch.cat([w * factor_b for (_, factor_b), w in zip(pairs, self.active.values())], dim=1)
        base_dtype = self.base_layer.weight.dtype
        dtype = base_dtype if a.device.type != "cpu" and base_dtype.is_floating_point else a.dtype
        self.packed = (a.T.to(dtype).contiguous(), b.T.to(dtype).contiguous())

    # ----------------------------------------------------------------------------------- merge
    def _weight_param(self) -> torch.Tensor:
        if is_quantized(self.base_layer):
            raise ValueError(
                f"cannot merge into a {type(self.base_layer).__name__} base in place: requantizing the "
                "merged weight would lose most of the adapter and unmerging could not be exact. Use the "
                "adapter unmerged, or export a merged full-precision model (it dequantizes the base)."
            )
        return self.base_layer.weight

    def merged_weight(self, weights: dict[str, float] | None = None) -> torch.Tensor:
        """W' = c * W0 + sum_i w_i D_i in (out, in) orientation, fp32. Every term is computed from
        the same W0, so the merged layer equals the unmerged mix."""
        weights = self.active if weights is None else weights
        w0 = dequantized_weight(self.base_layer).float()
        c = torch.ones(self.out_features, device=w0.device)
        total = torch.zeros_like(w0)
        with torch.no_grad():
            for name, w in weights.items():
                g, d = self.adapters[name].weight_terms(w0)
                total += w * d.float()
                if g is not None:
                    c += w * (g.float() - 1)
        return c[:, None] * w0 + total

    # merge and unmerge return before entering no_grad: every adapter switch calls them on every
    # layer, and entering no_grad costs microseconds each time, milliseconds per switch in all.
    def merge(self) -> None:
        if self.merged is not None or not self.active:
            return
        with torch.no_grad():
            param = self._weight_param()
            new = self.merged_weight()
            original = param.data.clone()
            param.copy_((new.T if is_conv1d(self.base_layer) else new).to(param.dtype))  # moves its version
        self.merged = original

    def unmerge(self) -> None:
        if self.merged is None:
            return
        with torch.no_grad():
            self._weight_param().copy_(self.merged)
        self.merged = None

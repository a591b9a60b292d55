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
        # Set while merged: the adapters folded into W0, their terms D and the row factor c, so that
        # unmerge can solve W0 = (W - sum w D) / c exactly instead of guessing.
        self.merged: dict | None = None

    @property
    def weight(self):  # lets code that inspects `layer.weight` (e.g. dtype checks) keep working
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged is not None or not self.active:
            return result
        base_result, base_out = result, None
        for name, w in self.active.items():
            adapter = self.adapters[name]
            dtype = next(adapter.parameters()).dtype
            if getattr(adapter, "lora_magnitude_vector", None) is not None and base_out is None:
                bias = getattr(self.base_layer, "bias", None)  # DoRA rescales W0 x, without the bias
                base_out = base_result if bias is None else base_result - bias
            delta = adapter(x.to(dtype), None if base_out is None else base_out.to(dtype), self)
            result = result + (delta if w == 1.0 else w * delta).to(result.dtype)
        return result

    # ----------------------------------------------------------------------------------- merge
    def _weight_param(self) -> torch.Tensor:
        if is_quantized(self.base_layer):
            raise ValueError(
                f"cannot merge into a {type(self.base_layer).__name__} base in place: requantizing the "
                "merged weight would lose most of the adapter and unmerging could not be exact. Use the "
                "adapter unmerged, or export a merged full-precision model (it dequantizes the base)."
            )
        return self.base_layer.weight

    def merged_weight(self, weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict]:
        """W' = c * W0 + sum_i w_i D_i in (out, in) orientation, fp32, and the record to undo it.
        Every term is computed from the same W0, so the merged layer equals the unmerged mix."""
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
        return c[:, None] * w0 + total, {"c": c, "total": total}

    # merge and unmerge return before entering no_grad: every adapter switch calls them on every
    # layer, and entering no_grad costs microseconds each time, milliseconds per switch in all.
    def merge(self) -> None:
        if self.merged is not None or not self.active:
            return
        with torch.no_grad():
            param = self._weight_param()
            new, record = self.merged_weight()
            param.data.copy_((new.T if is_conv1d(self.base_layer) else new).to(param.dtype))
        self.merged = record

    def unmerge(self) -> None:
        if self.merged is None:
            return
        with torch.no_grad():
            param = self._weight_param()
            w = param.data.float()
            w = w.T if is_conv1d(self.base_layer) else w
            w0 = (w - self.merged["total"]) / self.merged["c"][:, None]
            param.data.copy_((w0.T if is_conv1d(self.base_layer) else w0).to(param.dtype))
        self.merged = None

"""Delta-LoRA: after each optimizer step, W0 += lambda * (s B_new A_new - s B_old A_old).

Hooked on the optimizer (``register_step_pre_hook`` / ``register_step_post_hook``) so training loops
need no special case. The pre-hook keeps copies of A and B only (r x (in + out) per layer, never a
copy of W0). Since B starts at zero the updates telescope to W0_orig + lambda * sBA, which is why
``DeltaLoraAdapter.absorbed`` can account for them exactly when saving.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_app.lora.adapters import DeltaLoraAdapter
from lora_app.lora.model import adapter_modules, lora_layers
from lora_app.lora.quant import is_conv1d, is_quantized


def _delta_layers(model: nn.Module, name: str):
    layers = lora_layers(model)
    pairs = [(layers[path], adapter) for path, adapter in adapter_modules(model, name).items()
             if isinstance(adapter, DeltaLoraAdapter)]
    for layer, _ in pairs:
        if is_quantized(layer.base_layer):
            raise ValueError("Delta-LoRA updates the base weights, which a 4/8-bit base cannot take; "
                             "use full precision or another variant.")
    return pairs


@torch.no_grad()
def _add_to_base(layer, delta: torch.Tensor) -> None:
    weight = layer.base_layer.weight
    weight.add_((delta.T if is_conv1d(layer.base_layer) else delta).to(weight.dtype))


@torch.no_grad()
def absorb(model: nn.Module, name: str) -> None:
    """Bring a freshly loaded Delta-LoRA adapter into its training state: B / (1 + lambda) in the
    adapter, lambda * sBA in W0 (the state training left it in), so training can resume exactly."""
    for layer, adapter in _delta_layers(model, name):
        if adapter.absorbed == 0.0 and adapter.delta_lambda > 0:
            adapter.lora_B.weight.div_(1.0 + adapter.delta_lambda)
            _add_to_base(layer, adapter.delta_lambda * adapter.delta_weight())
            adapter.absorbed = adapter.delta_lambda


class DeltaLoraUpdater:
    """Attach to an optimizer: ``DeltaLoraUpdater(model, "default", optimizer)``; ``remove()`` detaches."""

    def __init__(self, model: nn.Module, name: str, optimizer: torch.optim.Optimizer):
        self.pairs = _delta_layers(model, name)
        absorb(model, name)  # a resumed adapter must be in training state before steps telescope
        self._before: list[torch.Tensor] = []
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    @torch.no_grad()
    def _pre(self, optimizer, args, kwargs):
        self._before = [(a.lora_A.weight.clone(), a.lora_B.weight.clone()) for _, a in self.pairs]

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs):
        for (layer, adapter), (a_old, b_old) in zip(self.pairs, self._before):
            # s (B A - B_old A_old) as one matmul: [B, -B_old] @ [A; A_old]
            b = torch.cat([adapter.lora_B.weight, -b_old], dim=1)
            a = torch.cat([adapter.lora_A.weight, a_old], dim=0)
            _add_to_base(layer, adapter.delta_lambda * adapter.scaling * (b @ a))
        self._before = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

"""Adapted layers that read the same input (q, k and v; gate and up) train as one.

The model still calls each layer itself. The first member called with an input computes every
member's output: on a GPU the base products as one product (the members' weights moved side by side,
their own weights now views of it; 4-bit ones as one dequantization, ``quant.Packed4bit``), then
``functional.LoraFunction`` runs the k adapters with one dropout mask (as peft does for a fused
``qkv_proj``) and one product for their A's, one for x's gradient. The other members are handed their
output when they are called with that same tensor. On a GPU, where a step of a small model is bound
by how fast the CPU issues kernels, a Llama layer's seven base nodes and seven adapter nodes become
four and four.

Only training with one plain LoRA adapter (LoRA, rsLoRA, LoRA-FA, Delta-LoRA) is grouped: anything
else (DoRA, VeRA, a mix, a merged or evaluating model) takes each layer's own path, on the same
weights. Group after the model is on its device: moving it later would part the shared weights from
the members' own.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lora_app.lora.adapters import LoraAdapter
from lora_app.lora.functional import lora_forward_shared
from lora_app.lora.layer import LoraLayer
from lora_app.lora.quant import Packed4bit, linear_4bit

# Sibling layers that read the same input in the architectures we know (Llama, Qwen, Mistral, ...)
SAME_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInput:
    """The members of one group and, between the first member's call and the others', their outputs
    (kept per thread)."""

    def __init__(self, layers: list[LoraLayer], move: bool | None = None):
        self.layers = layers
        self.base = shared_base([layer.base_layer for layer in layers], move)
        self._pending = threading.local()  # per thread: threads may train side by side (training.lanes)

    def output(self, layer: LoraLayer, x):
        """``layer``'s output for ``x``, or None where the group cannot run as one node."""
        pending = self._pending
        if getattr(pending, "input", None) is x and layer in pending.outputs:
            out = pending.outputs.pop(layer)
            if not pending.outputs:
                pending.input = None
            return out
        plan = self._plan()
        if plan is None:
            return None
        adapters, scaling, p = plan
        outs = lora_forward_shared(self.base(x), x, [adapter.lora_A.weight for adapter in adapters],
                                   [adapter.lora_B.weight for adapter in adapters], scaling, p)
        pending.input = x
        pending.outputs = {member: out for member, out in zip(self.layers, outs) if member is not layer}
        return outs[self.layers.index(layer)]

    def _plan(self) -> tuple[list[LoraAdapter], float, float] | None:
        """(each member's one active adapter, their scaling, their dropout) where all are plain LoRA of
        one scaling and dropout; else None."""
        adapters, settings = [], set()
        for member in self.layers:
            if not member.training or member.merged is not None or len(member.active) != 1:
                return None
            (name, weight), = member.active.items()
            adapter = member.adapters[name]
            if type(adapter).add_to is not LoraAdapter.add_to:
                return None
            adapters.append(adapter)
            settings.add((weight * adapter.scaling, adapter.dropout_p()))
        if len(settings) != 1:
            return None
        scaling, p = settings.pop()
        return adapters, scaling, p


def shared_base(layers: list[nn.Module], move: bool | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the layers' outputs side by side: one product where their weights can sit side by side
    (plain linear layers of one dtype, all with a bias or none; 4-bit ones of one kind without), else
    each layer's own output.

    Weights are moved (copied side by side) only on an accelerator unless ``move`` says: on a CPU a step
    is bound by the products themselves, which cost the same either way, and the process would keep the
    pages of the old weights (+124 MiB RSS for the default model's q, k, v, gate and up in bf16)."""
    if move is None:
        move = layers[0].weight.device.type != "cpu"
    if move and all(type(layer) is nn.Linear for layer in layers) \
            and len({(layer.weight.dtype, layer.weight.device, layer.bias is None) for layer in layers}) == 1:
        widths = [layer.out_features for layer in layers]
        with torch.no_grad():
            weight = torch.cat([layer.weight for layer in layers])
            bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
        for layer, rows in zip(layers, weight.split(widths)):
            layer.weight.data = rows
        for layer, values in zip(layers, bias.split(widths) if bias is not None else ()):
            layer.bias.data = values
        return lambda x: F.linear(x, weight, bias)
    if move and Packed4bit.fits(layers) and all(layer.bias is None for layer in layers):
        packed, compute_dtype = Packed4bit(layers), layers[0].compute_dtype
        return lambda x: linear_4bit(x, packed.dequantize, compute_dtype)
    return lambda x: torch.cat([layer(x) for layer in layers], dim=-1)


def group_shared_inputs(model: nn.Module, move: bool | None = None) -> int:
    """Make the adapted siblings of ``SAME_INPUT`` one group each (``move``: see ``shared_base``);
    returns how many groups."""
    count = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SAME_INPUT:
            members = [children.get(name) for name in names]
            if all(isinstance(m, LoraLayer) for m in members) and len({m.in_features for m in members}) == 1:
                group = SharedInput(members, move)
                for member in members:
                    member.group = group
                count += 1
    return count

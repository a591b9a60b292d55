"""Adapted layers that read the same input (q, k and v; gate and up) train as one node.

The model still calls each layer itself. The first member called with an input computes every
member's output, its base product and its adapter; ``functional.LoraFunction`` runs the k adapters
with one dropout draw and one batched product for the A side, one for x's gradient. The other members
are handed their output when they are called with that same tensor. On a GPU, where a step of a
small model is bound by how fast the CPU issues kernels, a Llama layer's seven adapter nodes become
four, and the step issues about a sixth fewer kernels (``bench/gpu_check.py``).

Only training with one plain LoRA adapter (LoRA, rsLoRA, LoRA-FA, Delta-LoRA) is grouped: anything
else (DoRA, VeRA, a mix, a merged or evaluating model) takes each layer's own path.
"""

from __future__ import annotations

from torch import nn

from lora_app.lora.adapters import Dropout, LoraAdapter
from lora_app.lora.functional import lora_forward_shared
from lora_app.lora.layer import LoraLayer

# Sibling layers that read the same input in the architectures we know (Llama, Qwen, Mistral, ...)
SAME_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInput:
    """The members of one group and, between the first member's call and the others', their outputs."""

    def __init__(self, layers: list[LoraLayer]):
        self.layers = layers
        self._input, self._outputs = None, {}

    def output(self, layer: LoraLayer, x):
        """``layer``'s output for ``x``, or None where the group cannot run as one node."""
        if x is self._input and layer in self._outputs:
            out = self._outputs.pop(layer)
            if not self._outputs:
                self._input = None
            return out
        plan = self._plan()
        if plan is None:
            return None
        adapters, scaling, p = plan
        outs = lora_forward_shared([member.base_layer(x) for member in self.layers], x,
                                   [adapter.lora_A.weight for adapter in adapters],
                                   [adapter.lora_B.weight for adapter in adapters], scaling, p)
        self._input = x
        self._outputs = {member: out for member, out in zip(self.layers, outs) if member is not layer}
        return outs[self.layers.index(layer)]

    def _plan(self) -> tuple[list[LoraAdapter], float, float] | None:
        """(each member's one active adapter, their scaling, their dropout) where all are plain LoRA of
        one rank, scaling and dropout; else None."""
        adapters, settings = [], set()
        for member in self.layers:
            if not member.training or member.merged is not None or len(member.active) != 1:
                return None
            (name, weight), = member.active.items()
            adapter = member.adapters[name]
            if type(adapter).add_to is not LoraAdapter.add_to:
                return None
            adapters.append(adapter)
            p = adapter.dropout.p if adapter.training and isinstance(adapter.dropout, Dropout) else 0.0
            settings.add((adapter.rank, weight * adapter.scaling, p))
        if len(settings) != 1:
            return None
        _, scaling, p = settings.pop()
        return adapters, scaling, p


def group_shared_inputs(model: nn.Module) -> int:
    """Make the adapted siblings of ``SAME_INPUT`` one group each; returns how many groups."""
    count = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SAME_INPUT:
            members = [children.get(name) for name in names]
            if all(isinstance(m, LoraLayer) for m in members) and len({m.in_features for m in members}) == 1:
                group = SharedInput(members)
                for member in members:
                    member.group = group
                count += 1
    return count

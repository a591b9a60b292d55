"""Products on blocked weights, for generation on a CPU with native bf16.

One token's row times a weight is bound by reading the weight. From the plain (out, in) layout
torch's bf16 product reads about 20 GB/s on a 2-core EPYC with AVX512-BF16; from oneDNN's blocked
layout (the one torch.compile's CPU "freezing" gives a weight) 35-90 GB/s. So every bf16
``nn.Linear`` of a chat model computes from a blocked copy of its weight (``BlockedLinear``), which
costs the weights' size again in RAM.

Layers that read the same input (an attention's q, k and v; an MLP's gate and up) form one
``LinearGroup`` and run as one product over their stacked weights: fewer, larger products read
faster, 2.1 ms less per token of SmolLM2-135M. The first member called computes the group's output
and the others take their columns of it. In an unmerged mode the group also adds its members'
adapters, as one low-rank pair for the whole group (``LinearGroup.delta``), and their LoRA wrappers
step aside: A joins the blocked weight, so what is left is one small product (by B) per group.

After the prompt, a token of a Llama-family model takes a shorter way than the model's forward
(``TokenStep``): the same operations, called directly.

The blocked copy is remade whenever a member's weight changed: merging an adapter writes into the
weight in place, which moves its version counter (``LoraLayer.merge`` writes through the parameter,
never through ``.data``, for this reason), and moving the model gives it new storage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lora_app.hardware import native_bf16_cpu
from lora_app.lora import SAME_INPUT, LoraLayer


class LinearGroup:
    """Linear layers that read the same input, computed as one product (see the module's doc)."""

    def __init__(self, members: list["BlockedLinear"]):
        self.members = members
        self.width = 0  # the members' output columns, side by side
        for member in members:
            member.group, member.columns = self, slice(self.width, self.width + member.out_features)
            self.width += member.out_features
        # The members' adapters as one pair (A^T, B^T) over the group's columns, set while generating
        # in an unmerged mode: A joins the blocked weight, so one product also gives x A^T.
        self.delta: tuple[torch.Tensor, torch.Tensor] | None = None
        self._made_from, self._blocked, self._bias = None, None, None
        self._input, self._output, self._waiting = None, None, 0

    def output(self, member: "BlockedLinear", x: torch.Tensor) -> torch.Tensor:
        """``member``'s columns of the group's output for ``x``, computed once for all members."""
        if len(self.members) == 1:
            return self.compute(x)
        if self._input is not x:  # (the members are called one after the other on the same tensor)
            self._input, self._output = x, self.compute(x)
            self._waiting = len(self.members)
        columns = self._output[..., member.columns]
        self._waiting -= 1
        if self._waiting == 0:  # let go of the output as soon as every member has its part
            self._input = self._output = None
        return columns

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The whole group's output for ``x``, its members' columns side by side."""
        y = torch.ops.mkldnn._linear_pointwise(x, self.blocked_weight(), self._bias, "none", [], "")
        if self.delta is None:
            return y
        _, b_t = self.delta
        out, h = y[..., :self.width], y[..., self.width:]
        out.view(-1, self.width).add_(h.reshape(-1, h.shape[-1]).to(b_t.dtype) @ b_t)
        return out

    def blocked_weight(self) -> torch.Tensor:
        """The blocked copy of the stacked weights (and A, while ``delta`` is set) as they are now,
        remade here if a weight or the delta changed. It is remade, not kept beside the other: a
        second copy would cost the weights' size again."""
        made_from = ([(m.weight.data_ptr(), m.weight._version) for m in self.members], self.delta)
        if self._made_from is None or made_from[0] != self._made_from[0] or made_from[1] is not self._made_from[1]:
            with torch.no_grad():
                rows = [m.weight for m in self.members]
                biases = [m.bias if m.bias is not None else rows[0].new_zeros(m.out_features) for m in self.members]
                if self.delta is not None:
                    rows.append(self.delta[0].T.to(rows[0].dtype))
                    biases.append(rows[0].new_zeros(rows[-1].shape[0]))
                self._blocked = torch.ops.mkldnn._reorder_linear_weight(torch.cat(rows), 1)
                self._bias = torch.cat(biases) if any(m.bias is not None for m in self.members) else None
            self._made_from = made_from
        return self._blocked

    def stacked_pair(self, pairs: dict["BlockedLinear", tuple[torch.Tensor, torch.Tensor]]):
        """Members' low-rank pairs (A^T, B^T, as ``LoraLayer.pack`` makes them) as one pair over the
        group's columns: the A^T side by side, the B^T block-diagonal."""
        a_t = torch.cat([a for a, _ in pairs.values()], dim=1)
        b_t = a_t.new_zeros(a_t.shape[1], self.width)
        row = 0
        for member, (_, b) in pairs.items():
            b_t[row:row + b.shape[0], member.columns] = b
            row += b.shape[0]
        return a_t, b_t


class BlockedLinear(nn.Linear):
    """A bf16 CPU linear layer computed by its ``LinearGroup`` from blocked weights (set on a loaded
    model by ``blocked_weights``, which changes only the class: names, weights and LoRA wrappers stay)."""

    group: LinearGroup
    columns: slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)
        return self.group.output(self, x)


def supported() -> bool:
    """Whether this CPU computes bf16 natively and oneDNN's blocked bf16 products run on it."""
    return native_bf16_cpu() is not None and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def blocked_weights(model: nn.Module) -> list[LinearGroup]:
    """Make every plain bf16 CPU ``nn.Linear`` of ``model`` a ``BlockedLinear``, siblings that read
    the same input one group; returns the groups. For a CPU with native bf16 only: elsewhere oneDNN
    emulates bf16 products."""
    groups = []
    for parent in model.modules():
        children = {name: child for name, child in parent.named_children()
                    if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16
                    and child.weight.device.type == "cpu"}
        for names in SAME_INPUT:
            members = [children[name] for name in names if name in children]
            if len(members) == len(names) and len({m.in_features for m in members}) == 1:
                groups.append(_group(members))
                for name in names:
                    del children[name]
        groups += [_group([child]) for child in children.values()]
    return groups


def _group(members: list[nn.Linear]) -> LinearGroup:
    for member in members:
        member.__class__ = BlockedLinear
    return LinearGroup(members)


def folded_adapters(wrappers: dict[str, LoraLayer]) -> tuple[dict[LinearGroup, tuple], set[str]]:
    """For an unmerged mode, once its adapters are packed: each group's ``delta`` (its members'
    packed pairs as one), and the paths of the wrappers whose adapters those deltas carry (they
    step aside while generating). Wrappers without a pack (DoRA, VeRA) keep adding their own."""
    pairs: dict[LinearGroup, dict] = {}
    folded = set()
    for path, wrapper in wrappers.items():
        base = wrapper.base_layer
        if (isinstance(base, BlockedLinear) and wrapper.packed is not None and wrapper.active
                and wrapper.merged is None):
            pairs.setdefault(base.group, {})[base] = wrapper.packed
            folded.add(path)
    return {group: group.stacked_pair(members) for group, members in pairs.items()}, folded


class TokenStep:
    """One token at a time through a Llama-family model whose linear layers are all blocked and in
    place (no LoRA wrapper left between them: see ``LoadedBase._locked_ready``), calling the model's
    own norms, rotary embedding, activation and the groups directly, with keys and values in a
    cache allotted once. The same operations as the model's forward for one token, so the same
    logits to the bit (tested), without what that forward spends around them (module calls, masks,
    keyword plumbing, a cache that is concatenated again for every token): 1.14-1.22x per token of
    SmolLM2 (``bench/bench_inference.py``).

    Made by ``TokenStep.after_prompt`` once the prompt has gone through the model's own forward."""

    MODEL_TYPES = ("llama", "qwen2")  # the same decoder layer: q/k/v (qwen2 with biases), o, gate/up, down
    PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    @classmethod
    def after_prompt(cls, model: nn.Module, cache, room: int) -> "TokenStep | None":
        """The step for ``model`` continuing from ``cache`` (a ``DynamicCache`` holding the prompt),
        with room for ``room`` positions in all; None where the model is not of that kind."""
        config = model.config
        full = all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())
        if config.model_type not in cls.MODEL_TYPES or not full or not isinstance(model.lm_head, BlockedLinear):
            return None
        layers = model.model.layers
        if not all(isinstance(layer.get_submodule(path), BlockedLinear) for layer in layers for path in cls.PROJECTIONS):
            return None
        return cls(model, cache, room)

    def __init__(self, model: nn.Module, cache, room: int):
        self.model, self.layers = model.model, model.model.layers
        self.lm_head = model.lm_head.group
        attention = self.layers[0].self_attn
        self.heads = model.config.num_attention_heads
        self.kv_heads, self.head_dim = model.config.num_key_value_heads, attention.head_dim
        self.position = cache.get_seq_length()
        self.keys, self.values = [], []
        for layer in cache.layers:
            for stored, rooms in ((layer.keys, self.keys), (layer.values, self.values)):
                spare = stored.new_empty(*stored.shape[:-2], room, stored.shape[-1])
                spare[..., :self.position, :] = stored
                rooms.append(spare)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """The logits (1, 1, vocabulary) for one more token ``ids`` (1, 1)."""
        x = self.model.embed_tokens(ids)
        cos, sin = self.model.rotary_emb(x, torch.tensor([[self.position]], device=ids.device))
        at, end = self.position, self.position + 1
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attention, mlp = layer.self_attn, layer.mlp
            qkv = attention.q_proj.group.compute(layer.input_layernorm(x))
            q, k, v = (part.view(1, 1, -1, self.head_dim).transpose(1, 2)
                       for part in qkv.split([q_width, kv_width, kv_width], dim=-1))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys[..., at:end, :], values[..., at:end, :] = k, v
            a = F.scaled_dot_product_attention(q, keys[..., :end, :], values[..., :end, :], scale=attention.scaling,
                                               enable_gqa=True)  # as transformers' sdpa attention calls it
            x = x + attention.o_proj.group.compute(a.transpose(1, 2).reshape(1, 1, q_width))
            gate_up = mlp.gate_proj.group.compute(layer.post_attention_layernorm(x))
            gate, up = gate_up[..., :mlp.gate_proj.out_features], gate_up[..., mlp.gate_proj.out_features:]
            x = x + mlp.down_proj.group.compute(mlp.act_fn(gate) * up)
        self.position = end
        return self.lm_head.compute(self.model.norm(x))

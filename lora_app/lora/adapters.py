"""One adapter on one layer, per variant. Each is a small module with three duties:

* ``forward(x, base_out, layer)`` returns what it adds to the layer's output;
* ``weight_terms(W0)`` returns ``(g, D)`` such that its whole effect on the weight is
  ``W' = g * W0 + D`` (``g`` a per-output-row vector, or None for 1). Merging is then exact and
  linear, and unmerging just solves for W0 (see ``layer.LoraLayer.merge``);
* ``tensors()`` / ``load_tensors()`` name its saved tensors in the peft layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_app.lora.config import LoraConfig
from lora_app.lora.functional import dropout, lora_forward
from lora_app.lora.quant import dequantized_weight


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn as ``functional.keep_mask`` draws it (much cheaper on a CPU).
    Autograd keeps the boolean mask (1 byte per element), as ``nn.Dropout`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p) if self.training and self.p > 0 else x


class Adapter(nn.Module):
    """What every variant shares: its saved tensors are its parameters under peft key suffixes."""

    def saved_params(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def add_to(self, result: torch.Tensor, x: torch.Tensor, weight: float, base_out: torch.Tensor | None,
               layer) -> torch.Tensor:
        """``result + weight * forward(x)``, in ``result``'s dtype."""
        delta = self(x.to(next(self.parameters()).dtype), base_out, layer)
        return result + (delta if weight == 1.0 else weight * delta).to(result.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A, B)`` with ``forward`` exactly ``B (A x)`` outside training, or None where the
        variant is not of that form; lets ``LoraLayer.pack`` run a whole mix as one pair."""
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """What ``save_adapter`` writes (a variant may transform it, see Delta-LoRA)."""
        return self.saved_params()

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, param in self.saved_params().items():
                param.copy_(tensors[key])


class LoraAdapter(Adapter):
    """Plain LoRA (and rsLoRA, whose only difference is ``config.scaling``).

    delta(x) = s * B A dropout(x), A (r x in) kaiming-uniform, B (out x r) zeros, so a new adapter
    leaves the model unchanged.
    """

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, device=None):
        super().__init__()
        self.config = config
        self.rank = config.rank
        self.scaling = config.scaling
        self.lora_A = nn.Linear(in_features, config.rank, bias=False, device=device)
        self.lora_B = nn.Linear(config.rank, out_features, bias=False, device=device)
        self.dropout = Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        # scaling applied on the r-wide intermediate: the same product, r/out of the elementwise work
        return self.lora_B(self.lora_A(self.dropout(x)) * self.scaling)

    def add_to(self, result, x, weight, base_out, layer):
        # one autograd node instead of eight, no copy of x kept (functional.py)
        return lora_forward(result, x, self.lora_A.weight, self.lora_B.weight, weight * self.scaling,
                            self.dropout_p())

    def dropout_p(self) -> float:
        """The dropout probability of a forward pass now (0 outside training)."""
        return self.dropout.p if self.training and isinstance(self.dropout, Dropout) else 0.0

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def factors(self):
        return self.lora_A.weight, self.lora_B.weight * self.scaling

    def weight_terms(self, base_weight: torch.Tensor):
        return None, self.delta_weight()

    def saved_params(self):
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}


class LoraFAAdapter(LoraAdapter):
    """LoRA-FA: A stays at its random init (frozen), only B trains — half the adapter's optimizer
    state and no activation memory for A's input gradient."""

    def __init__(self, in_features, out_features, config, device=None):
        super().__init__(in_features, out_features, config, device)
        self.lora_A.weight.requires_grad_(False)


class DeltaLoraAdapter(LoraAdapter):
    """Delta-LoRA: plain LoRA in the forward pass; ``lora.delta.DeltaLoraUpdater`` also moves W0 by
    ``lambda * Delta(sBA)`` after each optimizer step.

    Because B starts at zero the updates telescope: after training W0 = W0_orig + lambda * sBA, so the
    model equals W0_orig + (1 + lambda) sBA. ``absorbed`` is the multiple of sBA currently folded
    into W0; saving writes B * (1 + absorbed), a plain LoRA adapter for the original base.
    """

    def __init__(self, in_features, out_features, config, device=None):
        super().__init__(in_features, out_features, config, device)
        self.delta_lambda = config.delta_lambda
        self.absorbed = 0.0

    def tensors(self):
        return {**self.saved_params(), "lora_B.weight": self.lora_B.weight * (1.0 + self.absorbed)}

    def load_tensors(self, tensors):
        super().load_tensors(tensors)
        self.absorbed = 0.0


class DoraAdapter(LoraAdapter):
    """DoRA: W' = m * (W0 + sBA) / ||W0 + sBA||, the norm taken per output row and detached
    (as in the paper, so the norm is treated as a constant in backward).

    Written as an addition to the base output: with f = m / ||W0 + sBA||,
    delta(x) = (f - 1) * W0 x + f * s B A x.
    """

    def __init__(self, in_features, out_features, config, device=None, base_weight: torch.Tensor | None = None):
        super().__init__(in_features, out_features, config, device)
        magnitude = torch.ones(out_features, device=device)
        if base_weight is not None:  # m starts at ||W0|| so that W' = W0 at init
            magnitude = base_weight.detach().float().norm(dim=1).to(device)
        self.lora_magnitude_vector = nn.Parameter(magnitude)

    def _row_scale(self, base_weight: torch.Tensor) -> torch.Tensor:
        w = base_weight.to(self.lora_A.weight.dtype) + self.delta_weight()
        return self.lora_magnitude_vector / w.norm(dim=1).detach()

    add_to = Adapter.add_to  # the row norm rescales the base output too: not plain LoRA's node

    def forward(self, x, base_out, layer):
        base_weight = dequantized_weight(layer.base_layer)
        f = self._row_scale(base_weight)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_term = base_out  # W0 x is already known: no second matmul
        else:  # the W0 term must see the same dropped-out input as the LoRA term (as peft does)
            x = self.dropout(x)
            base_term = F.linear(x, base_weight.to(x.dtype))
        lora = self.lora_B(self.lora_A(x)) * self.scaling
        return (f - 1) * base_term + f * lora

    def weight_terms(self, base_weight):
        f = self._row_scale(base_weight).detach()
        return f, f[:, None] * self.delta_weight()

    def factors(self):
        return None  # the row norm rescales the base output too

    def saved_params(self):
        return {**super().saved_params(), "lora_magnitude_vector": self.lora_magnitude_vector}


class VeraProjection:
    """VeRA's frozen random pair shared by every layer: A (r x max_in), B (max_out x r).

    Drawn from ``seed`` exactly as peft draws them (kaiming-uniform from one CPU generator, A then B),
    so an adapter saved without projections still loads identically. Layers slice what they need.
    Kept off the module tree on purpose: one CPU copy, and one cached copy per device/dtype in use.
    """

    def __init__(self, rank: int, max_in: int, max_out: int, seed: int = 0, A=None, B=None):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.seed = seed
        self.A = A if A is not None else self._kaiming((rank, max_in), generator)
        self.B = B if B is not None else self._kaiming((max_out, rank), generator)
        self._cache: dict = {}

    @staticmethod
    def _kaiming(shape, generator):
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)

    def get(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (self.A.to(device, dtype), self.B.to(device, dtype))
        return self._cache[key]


class VeraAdapter(Adapter):
    """VeRA: delta(x) = lambda_b * (B_s (lambda_d * (A_s dropout(x)))), with A_s, B_s the shared
    projections sliced to this layer; only lambda_d (r, init ``vera_d_initial``) and lambda_b
    (out, init 0) train."""

    def __init__(self, in_features, out_features, config: LoraConfig, projection: VeraProjection, device=None):
        super().__init__()
        self.config = config
        self.rank = config.rank
        self.in_features, self.out_features = in_features, out_features
        self.projection = projection
        self.vera_lambda_d = nn.Parameter(torch.full((config.rank,), float(config.vera_d_initial), device=device))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, device=device))
        self.dropout = Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _sliced(self, device, dtype):
        A, B = self.projection.get(device, dtype)
        return A[:, : self.in_features], B[: self.out_features, :]

    def forward(self, x, base_out, layer):
        A, B = self._sliced(x.device, x.dtype)
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(self.dropout(x), A), B)

    def weight_terms(self, base_weight):
        A, B = self._sliced(self.vera_lambda_d.device, self.vera_lambda_d.dtype)
        return None, (self.vera_lambda_b[:, None] * B) @ (self.vera_lambda_d[:, None] * A)

    def saved_params(self):
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}


ADAPTER_CLASSES = {
    "lora": LoraAdapter,
    "rslora": LoraAdapter,
    "lora-fa": LoraFAAdapter,
    "delta-lora": DeltaLoraAdapter,
    "dora": DoraAdapter,
    "vera": VeraAdapter,
}

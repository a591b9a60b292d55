"""The token loop behind every generation: the prompt in one forward pass, then one token per pass.

Why not transformers' ``generate``: on a small model its own bookkeeping per token (input
preparation, kwargs updates, stopping criteria, a streamer thread) costs about a tenth of the time,
and chat wants every token it can get (``bench/bench_inference.py``). Sampling stays exactly
``generate``'s: the same logits processors in the same order, float32 scores and one
``torch.multinomial`` draw per token, so a seed gives the same text (tested). The draw uses its
own ``torch.Generator``, so two streams never touch each other's random state.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lora_app.hardware import attention_kernels
from lora_app.inference.blocked import TokenStep
from lora_app.inference.settings import GenerationSettings


def column_major(model) -> None:
    """Store each fp32 linear weight of a CPU model transposed in memory (the tensor itself keeps
    its shape and values). Generating one token multiplies a single row by every weight: with the
    weight stored (in, out) that product reads memory in order, and on an AVX2 CPU the output layer
    alone runs about 1.8x faster and a whole token about 7 % (``bench/bench_inference.py``). Prompt
    passes and exports are unaffected (exports copy to contiguous tensors)."""
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(weight, nn.Parameter)
                    and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2
                    and weight.is_contiguous()):
                weight.data = weight.data.t().contiguous().t()


FP32_ROWS = 16  # above this many rows at once, a bf16 layer computes in fp32 (measured crossover 16-32)


class Fp32PromptLinear(nn.Linear):
    """A bf16 linear layer that computes a pass of many rows (a prompt) in fp32: on a CPU without
    native bf16 a bf16 matrix product is emulated and several times slower, while one token's row
    is bound by reading the weight, where bf16's half-size weight wins. Set on a loaded model by
    ``fp32_prompt_passes``, which changes only the class, so names, weights and the LoRA wrappers
    around the layer stay as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.shape[:-1].numel() <= FP32_ROWS:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def fp32_prompt_passes(model) -> None:
    """Make every plain bf16 ``nn.Linear`` of ``model`` an ``Fp32PromptLinear``."""
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16:
            module.__class__ = Fp32PromptLinear


def logits_processors(settings: GenerationSettings, prompt_len: int, eos_ids: list[int],
                      device: torch.device) -> LogitsProcessorList:
    """What ``generate`` would apply for these settings, in its order, with their tensors on ``device``
    (the scores' device: a GPU's scores met CPU eos ids in ``torch.isin`` and stopped the reply)."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(settings.repetition_penalty)))
    if settings.min_new_tokens:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_len, settings.min_new_tokens, eos_ids,
                                                            device=str(device)))
    if not settings.greedy:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(settings.temperature)))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(float(settings.top_p)))
    return processors


class TokenLoop:
    """Yields new token ids for one prompt (batch of one) until EOS, ``max_new_tokens`` or ``cancel``.

    ``seconds`` is the time spent computing, not the time the caller spent between tokens."""

    def __init__(self, model, settings: GenerationSettings, eos_ids: list[int], cancel: threading.Event):
        self.model, self.settings, self.eos_ids, self.cancel = model, settings, list(eos_ids), cancel
        self.seconds = 0.0
        self._keep_one = "logits_to_keep" in inspect.signature(model.forward).parameters

    @torch.inference_mode()
    def _forward(self, cache, ids: torch.Tensor) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if self._keep_one else {}
        with attention_kernels(ids.device.type):  # every token has a new key length
            return self.model(input_ids=ids, past_key_values=cache, use_cache=True, **extra).logits

    @torch.inference_mode()
    def _next(self, logits: torch.Tensor, processors, generator, all_ids: torch.Tensor) -> torch.Tensor:
        scores = processors(all_ids, logits[:, -1].to(dtype=torch.float32, copy=True))
        if self.settings.greedy:
            return scores.argmax(dim=-1)
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)

    def run(self, input_ids: torch.Tensor) -> Iterator[int]:
        start = time.perf_counter()
        prompt_len = input_ids.shape[1]
        processors = logits_processors(self.settings, prompt_len, self.eos_ids, input_ids.device)
        generator = None
        if not self.settings.greedy:
            generator = torch.Generator(device=input_ids.device)
            if self.settings.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.settings.seed)
        cache = DynamicCache(config=self.model.config)
        forward = functools.partial(self._forward, cache)
        all_ids, step_ids = input_ids, input_ids
        for n in range(self.settings.max_new_tokens):
            token = self._next(forward(step_ids), processors, generator, all_ids)
            if n == 0:  # the prompt went through the model's forward; the tokens may take a shorter way
                forward = TokenStep.after_prompt(self.model, cache, prompt_len + self.settings.max_new_tokens) or forward
            step_ids = token[:, None]
            all_ids = torch.cat([all_ids, step_ids], dim=-1)
            value = int(token)
            self.seconds += time.perf_counter() - start
            yield value
            start = time.perf_counter()
            if value in self.eos_ids or self.cancel.is_set():
                return

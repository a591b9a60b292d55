"""What this machine computes fast: the one place that picks the training precision.

A CPU runs bf16 matrix products natively only with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper
Lake) or AMX (Intel Sapphire Rapids and later); there bf16 is several times faster than fp32. Without
them oneDNN emulates bf16 and it is slower than fp32. ``torch.backends.cpu.get_cpu_capability()``
reads "AVX512" on both kinds, so the CPU's own feature flags decide. A CUDA GPU has bf16 from Ampere
on; older ones get fp16 with loss scaling.
"""

from __future__ import annotations

import functools
import platform
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BF16_CPU_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}  # /proc/cpuinfo flag -> its name
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """``name``: "bf16", "fp16" or "fp32"; ``reason``: why, in words for the log and the page;
    ``fp32_prompts``: generation only, the weights are held in bf16 but a prompt's pass (many rows
    at once) is computed in fp32 (see ``generation_precision``)."""

    name: str
    reason: str
    fp32_prompts: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} weights, fp32 prompts" if self.fp32_prompts else self.name

    @classmethod
    def of(cls, dtype: torch.dtype, reason: str) -> "Precision":
        return cls(next(name for name, known in DTYPES.items() if known == dtype), reason)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def accelerate(self) -> str:
        """accelerate's ``mixed_precision`` name."""
        return "no" if self.name == "fp32" else self.name


def _cpuinfo(field: str) -> str:
    """The first value of ``field`` in Linux ``/proc/cpuinfo`` ("" where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((line for line in text.splitlines() if line.startswith(field)), "")
    return line.partition(":")[2].strip()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where they cannot be read)."""
    return frozenset(_cpuinfo("flags").split())


def cpu_name() -> str:
    """The CPU's model name, for benchmark tables."""
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


def native_bf16_cpu() -> str | None:
    """The name of this CPU's native bf16 instructions, or None when it has none."""
    flags = cpu_flags()
    found = [name for flag, name in BF16_CPU_FLAGS.items() if flag in flags]
    return found[0] if found and torch.backends.mkldnn.is_available() else None


def choose_precision(requested: str, device_type: str) -> Precision:
    """The precision a run trains in (and the inference engine generates in): ``requested`` unless
    it is "auto", which picks the fastest that the hardware computes natively."""
    if requested != "auto":
        return Precision(requested, "chosen in the settings")
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "this GPU computes bf16 natively")
        return Precision("fp16", "this GPU has no bf16; fp16 with loss scaling")
    native = native_bf16_cpu()
    if native:
        return Precision("bf16", f"this CPU computes bf16 natively ({native})")
    return Precision("fp32", "this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is slower than fp32")


def generation_precision(device_type: str) -> Precision:
    """What the inference engine holds a base model's weights in: training's choice, except on a
    CPU without native bf16. Generating one token there reads every weight once and is bound by
    memory, so bf16 weights (half the bytes) run about twice as fast as fp32 even though the CPU
    converts them; a prompt's pass does real matrix products, which emulated bf16 makes several
    times slower, so those run in fp32 (``bench/bench_inference.py`` measures all three)."""
    chosen = choose_precision("auto", device_type)
    if device_type == "cpu" and chosen.name == "fp32":
        return Precision("bf16", "this CPU has no native bf16: bf16 weights make each token read half the "
                                 "bytes, and prompts are computed in fp32", fp32_prompts=True)
    return chosen


def attention_kernels(device_type: str):
    """The context a forward pass runs in, in training and generation: on a GPU, attention by the
    flash or memory-efficient kernels, never cuDNN's. cuDNN's attention builds an execution plan for
    every new sequence length; batches grouped by length have a new one almost every step (and each
    generated token a new key length), and its calls took 30 ms of CPU each on average, most of a
    training step (H200, Llama-3.2-1B's shape, batch 8)."""
    if device_type != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

"""What this machine computes fast: the one place that picks the training precision.

A CPU runs bf16 matrix products natively only with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper
Lake) or AMX (Intel Sapphire Rapids and later); there bf16 is several times faster than fp32. Without
them oneDNN emulates bf16 and it is slower than fp32. ``torch.backends.cpu.get_cpu_capability()``
reads "AVX512" on both kinds, so the CPU's own feature flags decide. A CUDA GPU has bf16 from Ampere
on; older ones get fp16 with loss scaling.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

BF16_CPU_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}  # /proc/cpuinfo flag -> its name


@dataclass(frozen=True)
class Precision:
    """``name``: "bf16", "fp16" or "fp32"; ``reason``: why, in words for the log and the page."""

    name: str
    reason: str

    @property
    def accelerate(self) -> str:
        """accelerate's ``mixed_precision`` name."""
        return "no" if self.name == "fp32" else self.name


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def native_bf16_cpu() -> str | None:
    """The name of this CPU's native bf16 instructions, or None when it has none."""
    flags = cpu_flags()
    found = [name for flag, name in BF16_CPU_FLAGS.items() if flag in flags]
    return found[0] if found and torch.backends.mkldnn.is_available() else None


def choose_precision(requested: str, device_type: str) -> Precision:
    """The precision a run trains in: ``requested`` unless it is "auto", which picks the fastest
    that the hardware computes natively."""
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

"""The memory allocator of training processes: jemalloc, where the machine has it.

With the C library's malloc (glibc) a CPU training process grows step after step: each micro-batch
of a new length asks for blocks of new sizes, and the blocks freed stay behind in the heap. On a
2-core EPYC with AVX512-BF16 (default model, alpaca demo data, batch 4, seq 256, bf16, 60 steps) the
peak RSS was 2.22 GiB with glibc and 1.69 GiB with jemalloc, whose size classes reuse what was
freed, at 298 and 315 useful tokens/s; the estimate shown before the run was 1.11 GiB. (The rest of
the growth is oneDNN's products cached per shape: see ``training.trainer.width_multiple``.)

An allocator is chosen when a process starts, so the training commands start themselves again with
jemalloc preloaded (``relaunch``) before anything is imported. Debian and Ubuntu ship it as
``libjemalloc2``. ``LORA_APP_ALLOCATOR=system`` keeps the C library's.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

SETTING = "LORA_APP_ALLOCATOR"  # "system": keep the C library's malloc


def jemalloc() -> str | None:
    """The name the dynamic loader knows jemalloc by (e.g. "libjemalloc.so.2"), or None."""
    if sys.platform != "linux":
        return None
    return ctypes.util.find_library("jemalloc")


def in_use() -> str:
    """Which allocator this process runs on, in words for its log."""
    if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return "jemalloc"
    if os.environ.get(SETTING) == "system":
        return f"the C library's malloc ({SETTING}=system)"
    if jemalloc() is None:
        return "the C library's malloc (jemalloc not found; on Debian or Ubuntu: apt-get install libjemalloc2)"
    return "the C library's malloc"


def environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` with jemalloc preloaded, where the machine has it and ``env`` does not refuse it."""
    library = jemalloc()
    preload = env.get("LD_PRELOAD", "")
    if library is None or env.get(SETTING) == "system" or "jemalloc" in preload:
        return env
    return {**env, "LD_PRELOAD": f"{library} {preload}".strip()}


def relaunch(argv: list[str]) -> None:
    """Replace this process by ``python -m lora_app *argv`` on jemalloc, if it is not on it already
    and the machine has it; otherwise return. The process keeps its id, streams and folder."""
    env = environment(dict(os.environ))
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "lora_app", *argv], env)

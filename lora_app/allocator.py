"""How processes get their memory: training on jemalloc, generation on transparent huge pages.

With the C library's malloc (glibc) a CPU training process grows step after step: each micro-batch
of a new length asks for blocks of new sizes, and the blocks freed stay behind in the heap. On a
2-core EPYC with AVX512-BF16 (default model, alpaca demo data, batch 4, seq 256, bf16, 60 steps) the
peak RSS was 2.22 GiB with glibc and 1.69 GiB with jemalloc, whose size classes reuse what was
freed, at 298 and 315 useful tokens/s; the estimate shown before the run was 1.11 GiB. (The rest of
the growth is oneDNN's products cached per shape: see ``training.trainer.width_multiple``.)

A token of a chat reply reads every weight of the model once, and on 4 KiB pages the CPU's
prefetchers stop at every page boundary. Where the kernel gives transparent huge pages (2 MiB) only
to memory a program asks them for (mode "madvise", the usual default), the generating processes (the
studio, ``generate``) ask glibc's malloc to request them for every block it maps (the tunable
``glibc.malloc.hugetlb=1``, glibc >= 2.35). On a 2-core EPYC with AVX512-BF16 (default model, 64
greedy tokens, ``bench/bench_inference.py``) that made the studio's replies 8-16 % faster in every
mode; plain transformers' bf16 ``generate`` gained 34 %, from its plain-layout weights.

Both are chosen when a process starts, so those commands start themselves again (``relaunch``)
before anything is imported. Debian and Ubuntu ship jemalloc as ``libjemalloc2``.
``LORA_APP_ALLOCATOR=system`` keeps the C library's malloc as it is, for both.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

SETTING = "LORA_APP_ALLOCATOR"  # "system": keep the C library's malloc
HUGE_PAGES = "glibc.malloc.hugetlb=1"  # glibc's tunable: advise huge pages for every block malloc maps
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")  # e.g. "always [madvise] never"


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


def huge_pages_on_request() -> bool:
    """Whether this machine gives transparent huge pages only where they are asked for, and the C
    library can ask for them (glibc >= 2.35). Mode "always" gives them anyway; "never" not at all."""
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return False
    library, version = platform.libc_ver()
    return "[madvise]" in mode and library == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)


def training_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` with jemalloc preloaded, where the machine has it and ``env`` does not refuse it."""
    library = jemalloc()
    preload = env.get("LD_PRELOAD", "")
    if library is None or env.get(SETTING) == "system" or "jemalloc" in preload:
        return env
    return {**env, "LD_PRELOAD": f"{library} {preload}".strip()}


def generation_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` with glibc's malloc asking for huge pages, where that pays and ``env`` does not refuse it."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get(SETTING) == "system" or HUGE_PAGES in tunables or not huge_pages_on_request():
        return env
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}


def relaunch(args: list[str], environment: Callable[[dict[str, str]], dict[str, str]]) -> None:
    """Replace this process by ``python *args`` in ``environment`` of this process's one
    (``training_environment`` or ``generation_environment``), if that changes it; otherwise return.
    The process keeps its id, streams and folder."""
    env = environment(dict(os.environ))
    if env != os.environ:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *args], env)

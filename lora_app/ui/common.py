"""What every tab shares: turning exceptions into plain messages, number formatting, cached services.

Callbacks are plain functions (unit-tested without a browser); ``friendly`` is the safety net that
turns anything they raise into a readable toast, so the page never shows a traceback or a spinner
that never ends.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import secrets
import tempfile
import threading

import gradio as gr
import torch

from lora_app.errors import UserError
from lora_app.models import load_config, load_tokenizer
from lora_app.paths import app_home
from lora_app.training.store import RunStore, default_root

log = logging.getLogger("lora_app.ui")


OUT_OF_MEMORY = ("Out of memory. Close other runs or chats, or pick a smaller model, batch size or sequence "
                 "length (4-bit quantization helps on a GPU).")


def explain(err: BaseException) -> str:
    """The message to show for ``err``: its own words when it is one of ours, else its type and text."""
    if isinstance(err, gr.Error):
        return err.message
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return OUT_OF_MEMORY
    if isinstance(err, UserError):
        return str(err)
    log.exception("unexpected error in a UI callback")  # the console keeps the traceback for a bug report
    return f"Something went wrong ({type(err).__name__}: {err})."


def friendly(fn):
    """Wrap a callback so any exception becomes a ``gr.Error`` with a plain message (generators too)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:
                raise gr.Error(explain(err), print_exception=False) from err
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise gr.Error(explain(err), print_exception=False) from err
    return wrapper


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def fmt_count(n: int | None) -> str:
    if n is None:
        return "–"
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return str(n)


_store_lock = threading.Lock()
_stores: dict = {}


def run_store():
    """One RunStore per root folder for the whole process (opening one runs the schema script)."""
    root = default_root()
    with _store_lock:
        if root not in _stores:
            _stores[root] = RunStore(root)
        return _stores[root]


def browser_secret() -> str:
    """The key the page's saved state is encrypted with in the browser, kept in the app home so that the
    state survives a restart of the studio (Gradio's default key is new on every start)."""
    path = app_home() / "browser_state.key"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent)  # mode 0600: other users must not read a secret
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
        os.replace(tmp, path)
    return path.read_text().strip()


@functools.lru_cache(maxsize=4)
def tokenizer_for(model: str):
    return load_tokenizer(model)


@functools.lru_cache(maxsize=8)
def model_config_for(model: str):
    return load_config(model)

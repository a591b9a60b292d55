"""`lora-app studio`, `python -m lora_app studio` and `python app.py`: serve the studio in the browser.

It listens on 127.0.0.1:7860 unless ``--host`` / ``--port`` (or ``GRADIO_SERVER_NAME`` / ``PORT``,
which a Hugging Face Space sets) say otherwise. On a Space, runs are kept under /data when the Space
has persistent storage (``ui/space.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from lora_app.model_source import DEFAULT_MODEL
from lora_app.models import default_model_path
from lora_app.ui import build_app, launch
from lora_app.ui.adapters import base_for
from lora_app.ui.form import start_model
from lora_app.ui.space import configure_storage


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-app studio", description="Serve the studio in the browser.")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="the address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1; "
                        "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "7860")),
                   help="the port to listen on (default: $PORT, else 7860)")
    return p


def build():
    """The studio page, its storage chosen first (the header names the runs folder)."""
    configure_storage()
    return build_app()


def convert_default_model() -> None:
    """The embedded model is converted from GGUF once (first run only, ~1 min), before serving:
    otherwise the first page load would do it, and race the warm-up doing the same."""
    if start_model() == DEFAULT_MODEL:
        try:
            default_model_path()
        except Exception as err:  # the page still starts and says what is missing where the model is picked
            print(f"warning: {err}")


def warm_up() -> None:
    """Load the chat model while the first visitor looks at the Data tab."""
    try:
        base_for(start_model())
    except Exception as err:  # the page still works: it says what is missing where the model is picked
        print(f"warning: {err}")


def main(argv=None, demo=None) -> int:
    """Serve ``demo`` (default: a new page) until interrupted. ``argv`` may start with the command name,
    as ``lora_app.__main__`` passes it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "studio":
        argv = argv[1:]
    args = parser().parse_args(argv)
    demo = demo or build()
    convert_default_model()
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    launch(demo, server_name=args.host, server_port=args.port)
    return 0

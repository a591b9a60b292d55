"""LoRA Studio: `python app.py` serves the studio (PORT / GRADIO_SERVER_NAME change where it listens).

On a Hugging Face Space this is the entry point (README front matter: app_file app.py); runs are
kept under /data when the Space has persistent storage.
"""

import os
import threading

from lora_app.ui.space import configure_storage

configure_storage()  # before anything reads LORA_APP_HOME

from lora_app.ui import build_app, launch  # noqa: E402  (after the storage choice above)

demo = build_app()  # module level, so `gradio app.py` (hot reload) and Spaces find it


def convert_default_model() -> None:
    """The embedded model is converted from GGUF once (first run only, ~1 min), before serving:
    otherwise the first page load would do it, and race the warm-up doing the same."""
    from lora_app.models import default_model_path
    from lora_app.ui.form import start_model

    if start_model() == "default":
        try:
            default_model_path()
        except Exception as err:  # the page still starts and says what is missing where the model is picked
            print(f"warning: {err}")


def warm_up() -> None:
    """Load the chat model while the first visitor looks at the Data tab."""
    from lora_app.ui.adapters import base_for
    from lora_app.ui.form import start_model

    try:
        base_for(start_model())
    except Exception as err:  # the page still works: it says what is missing where the model is picked
        print(f"warning: {err}")


if __name__ == "__main__":
    convert_default_model()
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    launch(demo, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
           server_port=int(os.environ.get("PORT", "7860")))

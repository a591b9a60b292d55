"""LoRA Studio: `python app.py` serves the studio (PORT / GRADIO_SERVER_NAME change where it listens).

On a Hugging Face Space this is the entry point (README front matter: app_file app.py); runs are
kept under /data when the Space has persistent storage.
"""

import os

from lora_app.ui.space import configure_storage

configure_storage()  # before anything reads LORA_APP_HOME

from lora_app.ui import build_app, launch  # noqa: E402  (after the storage choice above)

demo = build_app()  # module level, so `gradio app.py` (hot reload) and Spaces find it

if __name__ == "__main__":
    try:  # convert the embedded model once before serving, so the first page load is quick
        from lora_app.models import default_model_path

        default_model_path()
    except Exception as err:  # the page still starts: it says what is missing where the model is picked
        print(f"warning: {err}")
    launch(demo, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
           server_port=int(os.environ.get("PORT", "7860")))

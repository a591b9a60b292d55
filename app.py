"""LoRA Studio: `python app.py` serves the studio, as `lora-app studio` does (see lora_app/studio.py).
On a Hugging Face Space this is the entry point (README front matter: app_file app.py)."""

import sys

from lora_app import allocator

if __name__ == "__main__":  # on huge pages where the machine has them, before torch loads (see lora_app.allocator)
    allocator.relaunch(sys.orig_argv[1:], allocator.generation_environment)  # with -u, -X, ...

from lora_app.studio import build, main  # noqa: E402

demo = build()  # module level, so `gradio app.py` (hot reload) finds it

if __name__ == "__main__":
    main(demo=demo)

"""LoRA Studio: `python app.py` serves the studio, as `lora-app studio` does (see lora_app/studio.py).
On a Hugging Face Space this is the entry point (README front matter: app_file app.py)."""

from lora_app.studio import build, main

demo = build()  # module level, so `gradio app.py` (hot reload) finds it

if __name__ == "__main__":
    main(demo=demo)

"""The browser studio (Gradio): Data, Model & LoRA, Train, Runs & adapters, Chat, Compare.

Thin over the library: every tab calls ``lora_app.data`` / ``training`` / ``inference`` and only
turns their results into widgets. ``build_app()`` makes the page, ``launch()`` serves it.
"""

from lora_app.ui.app import build_app, launch

__all__ = ["build_app", "launch"]

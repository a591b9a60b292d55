"""LoRA fine-tuning studio: a peft-free LoRA core, data, training, inference and a Gradio UI."""

__version__ = "0.1.0"

"""A chat Space of the trained model's own: a folder that Hugging Face Spaces runs as it is.

    app.py              a Gradio chat over the base model with the adapter merged in (transformers + peft)
    adapter/            the run's adapter, standard layout
    chat_template.jinja the template the run trained with, its system prompt choice built in
    requirements.txt    the versions the adapter was trained and checked with
    README.md           the Space's front matter and the model card: base model, data, settings, losses
    loss.svg            the loss curve

``BASE_MODEL`` in the environment points the app at a local copy of the base model (offline tests).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lora_app.data import PromptFormat
from lora_app.lora.io import CONFIG_NAME, WEIGHTS_NAME
from lora_app.paths import atomic_folder

REQUIREMENTS = ("torch", "transformers", "peft", "gradio", "safetensors", "accelerate")

APP = '''"""{title}: a chat with {base} fine-tuned with LoRA (made by LoRA Studio)."""

import os
from pathlib import Path

import gradio as gr
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).parent
BASE = os.environ.get("BASE_MODEL", {base!r})
TEMPLATE = (HERE / "chat_template.jinja").read_text()

tokenizer = AutoTokenizer.from_pretrained(BASE)
model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
model = PeftModel.from_pretrained(model, HERE / "adapter").merge_and_unload().eval()


def text_of(content):
    """Gradio hands message content as text or as a list of parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def respond(message, history):
    messages = [{{"role": m["role"], "content": text_of(m["content"])}} for m in history]
    messages.append({{"role": "user", "content": text_of(message)}})
    inputs = tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=256, do_sample=False, repetition_penalty=1.1)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


demo = gr.ChatInterface(respond, title={title!r}, description={description!r}, api_name="chat")

if __name__ == "__main__":
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))
'''


@dataclass
class ModelCard:
    """What the README says about the run."""

    title: str
    base: str  # the base model's Hub id (or path)
    data: str  # the dataset's name and size
    settings: dict = field(default_factory=dict)
    final_loss: float | None = None
    eval_loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) for the chart


def write_space(folder: str | os.PathLike, adapter_folder: str | os.PathLike, prompt_format: PromptFormat,
                tokenizer, card: ModelCard) -> Path:
    """Write the Space folder (replacing an earlier one of this run, whole or not at all)."""
    adapter_folder = Path(adapter_folder)
    template = prompt_format.standalone_template(tokenizer)

    def write(tmp: Path) -> None:
        (tmp / "adapter").mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(adapter_folder / name, tmp / "adapter" / name)
        (tmp / "chat_template.jinja").write_text(template)
        description = f"{card.base} fine-tuned with LoRA on {card.data}."
        (tmp / "app.py").write_text(APP.format(title=card.title, base=card.base, description=description))
        (tmp / "requirements.txt").write_text("".join(f"{name}=={importlib.metadata.version(name)}\n"
                                                      for name in REQUIREMENTS))
        (tmp / "loss.svg").write_text(loss_svg(card.losses))
        (tmp / "README.md").write_text(readme(card))

    return atomic_folder(Path(folder), write)


def readme(card: ModelCard) -> str:
    front = {"title": card.title[:30], "emoji": "🦜", "colorFrom": "indigo", "colorTo": "blue", "sdk": "gradio",
             "sdk_version": importlib.metadata.version("gradio"), "app_file": "app.py",
             "suggested_hardware": "cpu-basic", "base_model": card.base, "tags": ["lora", "lora-studio"]}
    rows = "\n".join(f"| {key} | {value} |" for key, value in card.settings.items())
    losses = ", ".join(f"{label} {value:.4f}" for label, value in (("final loss", card.final_loss),
                                                                   ("eval loss", card.eval_loss)) if value is not None)
    return ("---\n" + "".join(f"{key}: {json.dumps(value)}\n" for key, value in front.items()) + "---\n\n"
            f"# {card.title}\n\nA chat with [{card.base}](https://huggingface.co/{card.base}) fine-tuned with LoRA "
            f"in LoRA Studio, on {card.data}. The adapter is in `adapter/`; the chat template it was trained "
            f"with in `chat_template.jinja`.\n\n{losses}.\n\n![loss](loss.svg)\n\n| setting | value |\n|---|---|\n"
            f"{rows}\n")


def loss_svg(points: list[tuple[int, float]], width: int = 480, height: int = 200) -> str:
    """The loss curve as a small SVG line chart (no plotting library needed)."""
    if len(points) < 2:
        return f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'></svg>"
    steps, losses = zip(*points)
    low, high = min(losses), max(losses)
    pad = 30

    def x(step):
        return pad + (step - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 2 * pad)

    def y(loss):
        return height - pad - (loss - low) / max(high - low, 1e-9) * (height - 2 * pad)

    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
            f"font-size='11'><polyline fill='none' stroke='#6366f1' stroke-width='2' points='{line}'/>"
            f"<text x='{pad}' y='{pad - 10}'>loss {high:.2f}</text>"
            f"<text x='{pad}' y='{height - 8}'>{low:.2f} · step {steps[0]}–{steps[-1]}</text></svg>")

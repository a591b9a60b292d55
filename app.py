"""LoRA Studio web app: `python app.py` (set PORT / GRADIO_SERVER_NAME to change where it listens).

Until the full studio lands this page loads the embedded default model (SmolLM2-135M-Instruct,
offline) and answers one message, which proves the whole stack works on this machine.
"""

import functools
import os

import gradio as gr

from lora_app.inference import chat_reply
from lora_app.models import load_model


@functools.cache
def default_model():
    return load_model("default")


def answer(message: str) -> str:
    if not message or not message.strip():
        return "Type a message first."
    model, tokenizer = default_model()
    return chat_reply(model, tokenizer, [{"role": "user", "content": message}], max_new_tokens=96)


def build() -> gr.Blocks:
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown("# LoRA Studio\nChat with the embedded default model (SmolLM2-135M-Instruct).")
        prompt = gr.Textbox(label="Message", placeholder="Ask something…")
        reply = gr.Textbox(label="Reply", interactive=False)
        gr.Button("Send", variant="primary").click(answer, prompt, reply)
        prompt.submit(answer, prompt, reply)
    return demo


if __name__ == "__main__":
    default_model()  # convert/load before serving, so the first message is quick
    build().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   server_port=int(os.environ.get("PORT", "7860")))

"""Generation with base models and adapters."""

from lora_app.inference.generate import chat_reply

__all__ = ["chat_reply"]

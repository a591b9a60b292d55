"""One chat reply through the tokenizer's chat template."""

from __future__ import annotations

import torch


@torch.no_grad()
def chat_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> str:
    """The assistant's next turn after ``messages`` (``[{"role": ..., "content": ...}]``).
    Greedy when ``temperature`` is 0; stops at the tokenizer's EOS."""
    if not any(m.get("content", "").strip() for m in messages if m.get("role") == "user"):
        raise ValueError("The prompt is empty: type a message first.")
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

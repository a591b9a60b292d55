"""An Ollama ``Modelfile`` beside an exported GGUF, whose template renders prompts as training did.

Ollama templates are Go templates over ``.System`` and ``.Messages``. We write one for the ChatML
family (SmolLM2, Qwen, the ``chatml`` template: what the embedded default trains with) and put the run's
system prompt choice in ``SYSTEM``; other templates get no Modelfile, with the reason. ``render`` is
a renderer of exactly the Go template subset written here, so the template check can compare what
Ollama will see with what training saw.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lora_app.data import PromptFormat
from lora_app.data.templates import ChatTemplate, template_system_prompt
from lora_app.paths import atomic_file

_CHATML_TURNS = ('{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                 '{{ end }}{{ end }}<|im_start|>assistant\n')
_CHATML_SYSTEM = "<|im_start|>system\n{{ .System }}<|im_end|>\n"


@dataclass(frozen=True)
class Modelfile:
    template: str  # Go template
    system: str | None  # SYSTEM: given to conversations that bring none
    stop: tuple[str, ...]

    def text(self, gguf_name: str) -> str:
        lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{self.template}"""']
        if self.system is not None:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in self.stop]
        return "\n".join(lines) + "\n"

    def prompt(self, messages: list[dict]) -> str:
        """What Ollama renders for ``messages`` before the reply: ``.System`` is the conversation's own
        system turn, else ``SYSTEM``."""
        own = [m["content"] for m in messages if m["role"] == "system"]
        return render(self.template, {"System": own[-1] if own else (self.system or ""), "Messages": messages})


def modelfile_for(prompt_format: PromptFormat, tokenizer) -> tuple[Modelfile | None, str]:
    """The Modelfile for a run's prompt format, or None and why there is none."""
    if not _is_chatml(prompt_format.chat_template, tokenizer):
        return None, ("no Modelfile: only ChatML-style templates are translated to Ollama's; Ollama reads the "
                      "GGUF's own chat template instead")
    default = template_system_prompt(tokenizer, ChatTemplate(prompt_format.template, prompt_format.chat_template))
    filler = prompt_format.system_filler(tokenizer)
    system = filler if filler is not None else default
    template = (_CHATML_SYSTEM if system is not None else "{{ if .System }}" + _CHATML_SYSTEM + "{{ end }}") \
        + _CHATML_TURNS
    return Modelfile(template, system, ("<|im_end|>",)), ""


def write_modelfile(modelfile: Modelfile, gguf_path: Path) -> Path:
    """``<name>.Modelfile`` beside ``<name>.gguf`` (one per GGUF, so several types can share a folder)."""
    return atomic_file(gguf_path.with_suffix(".Modelfile"), lambda tmp: tmp.write_text(modelfile.text(gguf_path.name)))


def _is_chatml(chat_template: str, tokenizer) -> bool:
    """Whether the template writes ChatML turns (checked on a probe conversation)."""
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    want = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
            "<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n")
    try:
        got = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                            add_generation_prompt=True)
    except Exception:  # a template that refuses the probe is not one we can translate
        return False
    return got == want


# ---- the Go template subset written above -------------------------------------------------------------
_ACTION = re.compile(r"{{\s*(.*?)\s*}}", re.S)


def render(template: str, values: dict) -> str:
    """Render ``template`` (``.Field``, ``if .Field``, ``if ne .Field "x"``, ``range .List``, ``end``)."""
    parts = _ACTION.split(template)  # text, action, text, action, ...
    out, _ = _run(parts, 0, values)
    return out


def _run(parts: list[str], i: int, scope: dict) -> tuple[str, int]:
    out = []
    while i < len(parts):
        if i % 2 == 0:
            out.append(parts[i])
            i += 1
            continue
        action = parts[i]
        if action == "end":
            return "".join(out), i + 1
        if action.startswith("range "):
            items = scope[action[len("range ."):]]
            body_end = _skip(parts, i + 1)
            for item in items:
                out.append(_run(parts, i + 1, {**scope, **{k.capitalize(): v for k, v in item.items()}})[0])
            i = body_end
        elif action.startswith("if "):
            body_end = _skip(parts, i + 1)
            if _true(action[3:], scope):
                out.append(_run(parts, i + 1, scope)[0])
            i = body_end
        else:
            out.append(str(scope[action.lstrip(".")]))
            i += 1
    return "".join(out), i


def _skip(parts: list[str], i: int) -> int:
    """The index after the ``end`` closing the block that starts at ``i``."""
    depth = 0
    while True:
        if i % 2 == 1:
            if parts[i].startswith(("if ", "range ")):
                depth += 1
            elif parts[i] == "end":
                if depth == 0:
                    return i + 1
                depth -= 1
        i += 1


def _true(condition: str, scope: dict) -> bool:
    if condition.startswith("ne "):
        field, literal = condition[3:].split(" ", 1)
        return scope[field.lstrip(".")] != json.loads(literal)
    return bool(scope[condition.lstrip(".")])

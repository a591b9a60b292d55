"""Prompt templates: turning a sample into text segments, each marked trained or not.

A conversation is rendered with a Jinja chat template -- the tokenizer's own when it has one, or a
named template from ``NAMED_TEMPLATES`` (``alpaca``, ``chatml``) -- through
``tokenizer.apply_chat_template``; with the tokenizer's own template, training renders prompts
exactly as chat does at inference.

**How the trained spans are found.** The conversation is rendered incrementally: for each assistant
turn, once up to the turn with the generation prompt, once including the turn. The first rendering
is a prefix of the second, and the text between them is exactly what the model must produce for
that turn. This needs no knowledge of the template's markup, and fails loudly (the row is skipped)
for the rare template that renders earlier turns differently once later ones exist.

**EOS by construction.** The model stops when it produces ``tokenizer.eos_token``, so every trained
assistant span ends with it: the span runs up to and including the last EOS in the turn's text
(the newline a template writes after it is not trained), and when the template writes no EOS there
(a ChatML template on a tokenizer whose EOS is ``</s>``, say) the EOS is inserted after the turn.
"""

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jinja2

from lora_app.paths import write_json

from .errors import DataError, RowSkip
from .formats import Sample

Segment = tuple[str, bool]  # (text, trained)

ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

NAMED_TEMPLATES = {
    # Stanford Alpaca's prompt, extended to several turns; tool results are shown as input.
    "alpaca": (
        "{% if not messages or messages[0]['role'] != 'system' %}{{ '" + ALPACA_SYSTEM + "\\n\\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'tool' %}{{ '### Input:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # OpenAI's ChatML, as used by Qwen, SmolLM and many others.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
TOKENIZER_TEMPLATE = "tokenizer"
TEMPLATES = (TOKENIZER_TEMPLATE, *NAMED_TEMPLATES)  # what a user can choose (None: auto)


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template: ``name`` ("tokenizer" or a key of NAMED_TEMPLATES) and its Jinja source.

    ``bos`` is the text to put before a conversation: the tokenizer's BOS token for a named
    template on a tokenizer that adds one to plain text (a chat template writes its own BOS).
    """

    name: str
    source: str
    bos: str = ""


@dataclass(frozen=True)
class SystemPrompt:
    """The system turn every conversation is trained with -- and, stored with the adapter, chatted with.

    ``text``: one system prompt for every conversation, replacing the dataset's own (None keeps the
    dataset's). ``use_default``: where a conversation has no system turn, let the template add its
    default one (SmolLM2's names the model "SmolLM", which a persona dataset contradicts); when off,
    such a conversation gets an empty system turn, which keeps the default out of templates that have one.
    """

    text: str | None = None
    use_default: bool = True

    @classmethod
    def typed(cls, text: str | None, use_default: bool = True) -> "SystemPrompt":
        """As typed in a box or a flag: blank text is no system prompt of one's own."""
        return cls((text or "").strip() or None, bool(use_default))

    def apply(self, messages: list[dict], template_default: str | None) -> tuple[list[dict], str]:
        """(the conversation to render, where its system prompt comes from: SYSTEM_SOURCES)."""
        if self.text is not None:
            return [{"role": "system", "content": self.text}] + [m for m in messages if m["role"] != "system"], "run"
        if messages and messages[0]["role"] == "system":
            return messages, "dataset"
        if template_default is None:
            return messages, "none"
        if self.use_default:
            return messages, "template default"
        return [{"role": "system", "content": ""}] + messages, "none"


SYSTEM_SOURCES = ("run", "dataset", "template default", "none")
_PROBE = "\x00{}\x00"  # text no real conversation holds, to find where a template puts things


PROMPT_FORMAT_FILE = "prompt_format.json"


@dataclass(frozen=True)
class PromptFormat:
    """How a run rendered its conversations, kept next to its adapter (``PROMPT_FORMAT_FILE``) so that
    chat, compare and exports render prompts the way training did."""

    template: str  # "tokenizer" or a key of NAMED_TEMPLATES
    chat_template: str  # its Jinja source
    system: SystemPrompt

    def save(self, folder: str | os.PathLike) -> None:
        write_json(Path(folder) / PROMPT_FORMAT_FILE, asdict(self))

    def system_filler(self, tokenizer) -> str | None:
        """The system turn training gave a conversation that had none: the run's system prompt, an
        empty one (no template default), or None when the template was left to do as it does."""
        if self.system.text is not None:
            return self.system.text
        default = template_system_prompt(tokenizer, ChatTemplate(self.template, self.chat_template))
        return "" if not self.system.use_default and default is not None else None

    def standalone_template(self, tokenizer) -> str:
        """The chat template with the run's system prompt choice built in, for runtimes that apply the
        template alone (llama.cpp, LM Studio, transformers): a conversation without a system turn gets
        the one training gave it; one with its own keeps it."""
        filler = self.system_filler(tokenizer)
        if filler is None:
            return self.chat_template
        return ("{%- if not (messages and messages[0]['role'] == 'system') %}"
                "{%- set messages = [{'role': 'system', 'content': " + json.dumps(filler) + "}] + messages %}"
                "{%- endif %}" + self.chat_template)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "PromptFormat | None":
        """The adapter's prompt format; None for an adapter trained elsewhere (or on raw text)."""
        try:
            values = json.loads((Path(folder) / PROMPT_FORMAT_FILE).read_text())
            return cls(values["template"], values["chat_template"], SystemPrompt(**values["system"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def template_system_prompt(tokenizer, template: "ChatTemplate") -> str | None:
    """The system prompt ``template`` adds to a conversation that has none (None when it adds none).

    Rendered twice, once without a system turn and once with a marker as the system prompt: whatever
    stands in the marker's place in the first rendering is the template's default.
    """
    user = {"role": "user", "content": _PROBE.format("user")}
    try:
        plain = _render(tokenizer, template, [user], generation_prompt=False)
        marked = _render(tokenizer, template, [{"role": "system", "content": _PROBE.format("system")}, user],
                         generation_prompt=False)
    except RowSkip:  # a template that refuses system turns has no default one either
        return None
    before, _, after = marked.partition(_PROBE.format("system"))
    after = after[: after.find(user["content"])]
    plain = plain[: plain.find(user["content"])]
    if not after or not (plain.startswith(before) and plain.endswith(after)):
        return None
    return plain[len(before) : len(plain) - len(after)] or None


def with_system(sample: Sample, system: SystemPrompt, template_default: str | None) -> tuple[Sample, str]:
    """``sample`` with ``system`` applied (its untrained turn indices follow the moved turns) and the
    source of its system prompt; raw text samples have none."""
    if sample.text is not None:
        return sample, "none"
    messages, source = system.apply(list(sample.messages), template_default)
    if messages == list(sample.messages):
        return sample, source
    ids = {id(m): i for i, m in enumerate(sample.messages)}
    moved = {ids[id(m)]: i for i, m in enumerate(messages) if id(m) in ids}
    return replace(sample, messages=tuple(messages), untrained=frozenset(moved[i] for i in sample.untrained)), source


def text_template(tokenizer) -> ChatTemplate:
    """The "template" of raw text samples: no markup, only the BOS the tokenizer would add."""
    return ChatTemplate("none (raw text)", "", bos_text(tokenizer))


def resolve_template(tokenizer, name: str | None = None) -> tuple[ChatTemplate, str | None]:
    """The template to render with, and a note for the user when a choice was made for them.

    ``name`` None or "auto": the tokenizer's chat template, or ``alpaca`` if it has none;
    "tokenizer": the tokenizer's chat template (an error if it has none); or a named template.
    """
    if tokenizer.eos_token is None:
        raise DataError("The tokenizer has no EOS token, so a trained model could never stop; pick another model.")
    own = tokenizer.chat_template
    note = None
    if name in (None, "", "auto"):
        if own:
            name = TOKENIZER_TEMPLATE
        else:
            name = "alpaca"
            note = "The tokenizer has no chat template, so the alpaca template is used (another can be picked)."
    if name == TOKENIZER_TEMPLATE:
        if not own:
            raise DataError(f"The tokenizer has no chat template; pick one of: {', '.join(NAMED_TEMPLATES)}.")
        return ChatTemplate(TOKENIZER_TEMPLATE, own), note
    if name not in NAMED_TEMPLATES:
        raise DataError(f"Unknown template {name!r}; choose one of: auto, {TOKENIZER_TEMPLATE}, {', '.join(NAMED_TEMPLATES)}.")
    return ChatTemplate(name, NAMED_TEMPLATES[name], bos_text(tokenizer)), note


def bos_text(tokenizer) -> str:
    """The BOS token if this tokenizer puts one before plain text, else ``""``."""
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]
    return tokenizer.bos_token if adds_bos else ""


def render_segments(sample: Sample, tokenizer, template: ChatTemplate) -> list[Segment]:
    """The sample as ``(text, trained)`` segments whose concatenation is the training text.

    A raw text sample (rendered with :func:`text_template`) is one trained segment: text + EOS. An
    assistant turn in ``sample.untrained`` (loss weight 0) is rendered within the next prompt.

    Raises :class:`RowSkip` when the template rejects the conversation or cannot be split by turn.
    """
    eos = tokenizer.eos_token
    segments: list[Segment] = [(template.bos, False)]
    if sample.text is not None:
        return [segment for segment in [*segments, (sample.text + eos, True)] if segment[0]]
    messages = list(sample.messages)
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i in sample.untrained:
            continue
        prompt = _render(tokenizer, template, messages[:i], generation_prompt=True)
        full = _render(tokenizer, template, messages[: i + 1], generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise RowSkip("the chat template does not render this conversation turn by turn (pick a named template)")
        answer = full[len(prompt) :]
        end = answer.rfind(eos)
        if end < 0:  # the template writes no EOS after the answer: insert it
            body = answer.rstrip()
            answer, after = body + eos, answer[len(body) :]
        else:
            answer, after = answer[: end + len(eos)], answer[end + len(eos) :]
        segments += [(prompt[len(done) :], False), (answer, True), (after, False)]
        done = full
    return [segment for segment in segments if segment[0]]


def prompt_texts(messages: list[dict], tokenizer, template: ChatTemplate, system: SystemPrompt) -> list[str]:
    """What training puts before the reply to ``messages`` (a conversation ending in a user turn), as
    the texts it tokenizes one by one (as :func:`render_segments` does): the input that asks the model
    for an answer the way training taught it. Raises :class:`RowSkip` when the template refuses it."""
    messages, _ = system.apply(list(messages), template_system_prompt(tokenizer, template))
    return [text for text in (template.bos, _render(tokenizer, template, messages, generation_prompt=True)) if text]


def _render(tokenizer, template: ChatTemplate, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template.source, add_generation_prompt=generation_prompt, tokenize=False
        )
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        raise RowSkip(f"the chat template rejected the conversation: {err}") from None

"""Probe prompts: a few questions a run answers as it trains, so that its user sees what the adapter
does to *their* task -- and when it starts to overfit -- rather than only a loss curve.

A run answers its probes at step 0 (the new adapter is still zero, so these are the base model's
answers), at every evaluation and checkpoint, and at the end. Probes are typed (``probe_prompts``)
or taken from the validation rows (``probe_rows``: the conversation up to its first answer, that
answer kept as the reference and each generated answer scored against it by token F1). Answers are
greedy and short (``probe_tokens``), so probing costs seconds, which the run's summary reports.
Importable without torch: the trainer generates, this module decides what to ask and how to score.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from lora_app.data import Sample, SystemPrompt, prompt_texts
from lora_app.data.templates import ChatTemplate


@dataclass(frozen=True)
class Probe:
    prompt: str  # what is shown: the user's turn (or the text to continue, for a raw-text run)
    messages: tuple[dict, ...]  # the conversation to answer, ending in a user turn
    reference: str | None = None  # the answer the validation row gives


def probes_for(typed: list[str] | None, rows: int, val_samples: list[Sample]) -> list[Probe]:
    """The typed prompts, then up to ``rows`` validation rows with an answer to score against (raw
    text rows have no question and answer, so they are passed over). A prompt asked twice is asked
    once: votes and the timeline go by prompt."""
    probes = {text: Probe(text, ({"role": "user", "content": text},)) for text in typed or []}
    taken = 0
    for sample in val_samples:
        if taken == rows:
            break
        first = next((i for i, m in enumerate(sample.messages) if m["role"] == "assistant"), None)
        if not first:  # raw text, or a conversation that opens with an answer
            continue
        asked = next((m["content"] for m in reversed(sample.messages[:first]) if m["role"] == "user"), "")
        if asked not in probes:
            probes[asked] = Probe(asked, tuple(sample.messages[:first]), sample.messages[first]["content"])
            taken += 1
    return list(probes.values())


def input_texts(probe: Probe, tokenizer, template: ChatTemplate, system: SystemPrompt) -> list[str]:
    """The texts, tokenized one by one, that ask for an answer to ``probe`` the way training renders a
    prompt (a raw-text run continues the prompt as it is)."""
    if not template.source:
        return [text for text in (template.bos, probe.prompt) if text]
    return prompt_texts(list(probe.messages), tokenizer, template, system)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's token F1: the harmonic mean of the shares of answer words found in the reference and
    reference words found in the answer (lower-cased words, punctuation ignored)."""
    said, wanted = _words(answer), _words(reference)
    if not said or not wanted:
        return float(said == wanted)
    common = sum((Counter(said) & Counter(wanted)).values())
    if not common:
        return 0.0
    precision, recall = common / len(said), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def by_prompt(answers: list[dict]) -> dict[str, list[dict]]:
    """One run's probe answers (as the store gives them) grouped by prompt, in probe order, each in
    step order: the timeline of what the run answered."""
    grouped: dict[str, list[dict]] = {}
    for answer in sorted(answers, key=lambda a: (a["probe"], a["step"])):
        grouped.setdefault(answer["prompt"], []).append(answer)
    return grouped


def step_label(step: int) -> str:
    return "base (step 0)" if step == 0 else f"step {step}"

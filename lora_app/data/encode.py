"""Token ids and labels: what the model is trained on.

Each rendered segment is tokenized on its own and the ids are concatenated, so the boundary between
prompt and answer falls exactly between two tokens by construction (no offset mapping, no searching
for the answer in the token stream). It is also how the model sees text at inference: the prompt is
tokenized alone, and the answer is whatever tokens the model produces after it.

Labels are the input ids on trained segments and ``IGNORE_INDEX`` (-100, ignored by PyTorch's
cross-entropy) elsewhere; with ``train_on_prompt`` every token is trained. Labels are not shifted:
the model shifts them (label ``i`` is predicted from the tokens before ``i``).
"""

from collections.abc import Sequence

from .errors import RowSkip
from .formats import Sample
from .report import DataReport
from .templates import ChatTemplate, SystemPrompt, render_segments, template_system_prompt, with_system

IGNORE_INDEX = -100
_BATCH = 256  # samples tokenized per call: one call for many texts is several times faster


def encode_samples(
    samples: Sequence[Sample],
    tokenizer,
    template: ChatTemplate,
    report: DataReport,
    *,
    seq_len: int,
    train_on_prompt: bool = False,
    system: SystemPrompt = SystemPrompt(),
) -> tuple[list[dict[str, list[int]]], list[int], list[str]]:
    """Examples ``{"input_ids", "labels"}`` for the samples, their lengths before truncation, and where
    each one's system prompt comes from (``SYSTEM_SOURCES``; counted in ``report.system_prompts``).

    A sequence longer than ``seq_len`` keeps its first ``seq_len`` tokens and is counted in
    ``report.truncated``; one left with nothing to train on is skipped and counted instead.
    """
    examples, lengths, sources = [], [], []
    default = report.template_system = template_system_prompt(tokenizer, template) if template.source else None
    for start in range(0, len(samples), _BATCH):
        rendered = []
        for sample in samples[start : start + _BATCH]:
            sample, source = with_system(sample, system, default)
            try:
                rendered.append((sample, source, render_segments(sample, tokenizer, template)))
            except RowSkip as skip:
                report.skip(skip.reason, sample.where)
        texts = [text for _, _, segments in rendered for text, _ in segments]
        pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        for sample, source, segments in rendered:
            input_ids, labels = [], []
            for _, trained in segments:
                piece = next(pieces)
                input_ids += piece
                labels += piece if trained or train_on_prompt else [IGNORE_INDEX] * len(piece)
            length = len(input_ids)
            input_ids, labels = input_ids[:seq_len], labels[:seq_len]
            if all(label == IGNORE_INDEX for label in labels[1:]):  # label 0 is never predicted
                report.skip(f"the prompt fills seq_len ({seq_len} tokens): nothing left to train on", sample.where)
                continue
            report.truncated += length > seq_len
            examples.append({"input_ids": input_ids, "labels": labels})
            lengths.append(length)
            sources.append(source)
            report.system_prompts[source] += 1
    return examples, lengths, sources

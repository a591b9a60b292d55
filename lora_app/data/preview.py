"""The dataset preview the UI shows before training: what the model will be trained on.

:func:`preview_dataset` runs the same pipeline as training (so the preview cannot disagree with it)
and adds what a person needs to judge the data: a few examples decoded from their token ids with
the trained spans marked, and token-length statistics with a histogram.
"""

import html
import os
from dataclasses import dataclass, field

import numpy as np

from .encode import IGNORE_INDEX
from .packing import pack_examples
from .pipeline import prepare_dataset
from .report import DataReport
from .templates import SYSTEM_SOURCES

SYSTEM_LABELS = dict(zip(SYSTEM_SOURCES, ("the one set for this run", "the dataset's own", "the template's default",
                                                "none")))

Span = tuple[str, bool]  # (text, trained)


@dataclass
class LengthStats:
    """Token counts per training example, before truncation; ``over_max`` were truncated."""

    min: int
    median: int
    p95: int
    max: int
    over_max: int
    hist_counts: list[int] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)  # len(hist_counts) + 1 bin edges

    @classmethod
    def of(cls, lengths: list[int], seq_len: int, bins: int = 20) -> "LengthStats":
        values = np.asarray(lengths)
        counts, edges = np.histogram(values, bins=bins)
        return cls(
            min=int(values.min()),
            median=int(round(float(np.median(values)))),
            p95=int(round(float(np.percentile(values, 95)))),
            max=int(values.max()),
            over_max=int((values > seq_len).sum()),
            hist_counts=counts.tolist(),
            hist_edges=edges.tolist(),
        )


@dataclass
class Preview:
    """Everything the dataset panel shows. ``examples`` are lists of ``(text, trained)`` spans."""

    report: DataReport
    examples: list[list[Span]]
    lengths: LengthStats
    token_counts: list[int] = field(default_factory=list)  # per training example, before truncation
    systems: list[str] = field(default_factory=list)  # per example shown: where its system prompt comes from

    def summary(self) -> list[tuple[str, str]]:
        """``(label, value)`` lines describing the dataset, in display order."""
        r, s = self.report, self.lengths
        lines = [
            ("Source", r.source),
            ("Format", f"{r.format} ({'trained on assistant turns' if r.kind == 'chat' else 'trained on all text'})"),
            ("Columns", ", ".join(f"{f} ← {c}" for f, c in r.mapping.items())),
            ("Template", r.template),
            *([("System prompt", self.system_line())] if r.kind == "chat" else []),
            ("Rows", f"{r.rows_read} read · {r.train_rows} train · {r.val_rows} validation · {r.rows_skipped} skipped"),
            ("Tokens per example", f"min {s.min} · median {s.median} · p95 {s.p95} · max {s.max}"),
        ]
        if r.truncated:
            lines.append(("Truncated", f"{r.truncated} rows cut to {r.seq_len} tokens"))
        if r.packed_sequences is not None:
            lines.append(("Packing", f"{r.train_rows} examples → {r.packed_sequences} sequences of up to {r.seq_len} tokens"))
        lines += [("Skipped", line) for line in r.skipped_lines()]
        lines += [("Note", note) for note in r.notes]
        return lines

    def system_line(self) -> str:
        """Which system prompt the examples are trained with, by source; the template's default quoted,
        since nothing in the data shows it."""
        counts = self.report.system_prompts
        line = " · ".join(f"{SYSTEM_LABELS[s]} on {counts[s]} rows" for s in SYSTEM_SOURCES if counts[s])
        if counts["template default"]:
            line += (f". The template adds its default to rows without one: “{self.report.template_system}” "
                     "(set your own system prompt, or turn the default off)")
        return line

    def to_html(self) -> str:
        """The summary as a table, then the examples with trained text in ``<mark>``."""
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in self.summary())
        systems = self.systems or [""] * len(self.examples)
        examples = "".join(
            (f"<p class='lora-example-note'>System prompt: {SYSTEM_LABELS[system]}</p>" if system else "")
            + "<pre class='lora-example'>"
            + "".join(f"<mark>{html.escape(t)}</mark>" if trained else html.escape(t) for t, trained in spans)
            + "</pre>"
            for spans, system in zip(self.examples, systems)
        )
        legend = "<p>Highlighted text is what the model is trained to write.</p>"
        return f"<table class='lora-dataset'>{rows}</table>{legend}{examples}"


def preview_dataset(source: str | os.PathLike, tokenizer, *, examples: int = 3, bins: int = 20, **options) -> Preview:
    """Prepare ``source`` as :func:`prepare_dataset` would (``options`` are its keywords) and describe it.

    Examples are shown unpacked; with ``packing=True`` the report gives the number of sequences.
    """
    packing = options.pop("packing", False)
    data = prepare_dataset(source, tokenizer, **options)
    report = data.report
    if packing:
        report.packed_sequences = len(pack_examples(data.train, report.seq_len))
    return Preview(
        report=report,
        examples=[trained_spans(example, tokenizer) for example in data.train[:examples]],
        lengths=LengthStats.of(data.lengths, report.seq_len, bins),
        token_counts=data.lengths,
        systems=data.systems[:examples] if report.kind == "chat" else [],
    )


def trained_spans(example: dict[str, list[int]], tokenizer) -> list[Span]:
    """Decode an example into runs of untrained and trained tokens, special tokens included."""
    spans: list[Span] = []
    run: list[int] = []
    trained = None
    for token, label in zip(example["input_ids"], example["labels"]):
        is_trained = label != IGNORE_INDEX
        if run and is_trained != trained:
            spans.append((tokenizer.decode(run), trained))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        spans.append((tokenizer.decode(run), trained))
    return spans

"""From a dataset source to training examples: read, map, split, render, tokenize, pack.

Every row read ends up in exactly one place -- the training set, the validation set, or the
report's skipped counts -- so ``rows_read == train_rows + val_rows + rows_skipped`` always holds,
and a dataset with no usable row is an error that says why, never an empty result.
"""

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

from .encode import encode_samples
from .errors import DataError, RowSkip
from .formats import FORMATS, Format, Sample, resolve_format
from .packing import pack_examples
from .readers import Record, read_records
from .report import DataReport
from .split import split_rows
from .templates import ChatTemplate, SystemPrompt, resolve_template, text_template

DEFAULT_SEQ_LEN = 1024
# Refuse larger files: the tokenized dataset is held in memory (about 70 bytes per token).
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
_DETECT_ROWS = 100  # rows whose columns decide the layout


@dataclass
class PreparedData:
    """What training needs: the examples and the report.

    ``train`` and ``val`` are lists of ``{"input_ids", "labels"}`` (plus ``position_ids`` when
    packed) with no padding; batch them with :func:`~lora_app.data.tensors.collate`.
    ``lengths`` are the token counts of the training examples before truncation and packing.
    ``systems`` say where each training example's system prompt comes from (see ``SystemPrompt``).
    """

    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    report: DataReport
    lengths: list[int]
    systems: list[str]  # per training example: where its system prompt comes from (SYSTEM_SOURCES)
    template: ChatTemplate  # what the conversations were rendered with
    val_samples: list[Sample]  # the validation rows as read (probe prompts and their references come from them)


def prepare_dataset(
    source: str | os.PathLike,
    tokenizer,
    *,
    format: str | None = None,
    mapping: Mapping[str, str] | None = None,
    template: str | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    train_on_prompt: bool = False,
    system: SystemPrompt = SystemPrompt(),
    packing: bool = False,
    val_fraction: float = 0.0,
    val_data: str | os.PathLike | None = None,
    seed: int = 0,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    txt_split: str = "blank_line",
    limit: int | None = None,
) -> PreparedData:
    """Read ``source`` and turn it into training (and validation) examples for ``tokenizer``.

    See the package docstring for the options. Raises :class:`DataError` with a message for the
    user when the dataset cannot be used; rows that cannot be used are counted in the report.
    """
    if seq_len < 2:
        raise DataError(f"The maximum length must be at least 2 tokens, not {seq_len}.")
    report = DataReport(source=_display_name(source), seq_len=seq_len)
    fmt, train_samples, val_samples = load_split(
        source, report, format=format, mapping=mapping, val_fraction=val_fraction, val_data=val_data, seed=seed,
        max_file_bytes=max_file_bytes, txt_split=txt_split, limit=limit)

    if fmt.name == "text":
        chat_template = text_template(tokenizer)
    else:
        chat_template, note = resolve_template(tokenizer, template)
        if note:
            report.note(note)
    report.template = chat_template.name
    options = dict(seq_len=seq_len, train_on_prompt=train_on_prompt, system=system)
    train, lengths, systems = encode_samples(train_samples, tokenizer, chat_template, report, **options)
    val, _, _ = encode_samples(val_samples, tokenizer, chat_template, report, **options)
    if not train:
        raise DataError(_no_usable_rows(report))
    report.train_rows, report.val_rows = len(train), len(val)
    if packing:
        train, val = pack_examples(train, seq_len), pack_examples(val, seq_len)
        report.packed_sequences = len(train)
    return PreparedData(train=train, val=val, report=report, lengths=lengths, systems=systems,
                        template=chat_template, val_samples=val_samples)


def load_split(
    source: str | os.PathLike,
    report: DataReport | None = None,
    *,
    format: str | None = None,
    mapping: Mapping[str, str] | None = None,
    val_fraction: float = 0.0,
    val_data: str | os.PathLike | None = None,
    seed: int = 0,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    txt_split: str = "blank_line",
    limit: int | None = None,
) -> tuple[Format, list[Sample], list[Sample]]:
    """The training and validation samples (``val_fraction`` of the rows under ``seed``, or
    ``val_data``'s), before any tokenizer: reading and mapping mistakes show here. Fills ``report``."""
    report = DataReport(source=_display_name(source)) if report is None else report
    if val_data is not None and val_fraction:
        raise DataError("Use either a validation fraction or a validation file, not both.")
    fmt, samples = load_samples(
        source, report, format=format, mapping=mapping, max_file_bytes=max_file_bytes, txt_split=txt_split, limit=limit
    )
    if val_data is None:
        train_samples, val_samples = split_rows(samples, val_fraction, seed)
        if val_fraction and not val_samples:
            report.note("There are too few rows for a validation split, so there is none.")
        return fmt, train_samples, val_samples
    val_report = DataReport(source=_display_name(val_data))
    _, val_samples = load_samples(val_data, val_report, format=fmt.name, mapping=mapping,
                                  max_file_bytes=max_file_bytes, txt_split=txt_split, limit=limit)
    report.merge(val_report, "validation file")
    return fmt, samples, val_samples


def load_samples(
    source: str | os.PathLike,
    report: DataReport,
    *,
    format: str | None = None,
    mapping: Mapping[str, str] | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    txt_split: str = "blank_line",
    limit: int | None = None,
) -> tuple[Format, list[Sample]]:
    """Read ``source``, recognise its layout from the first rows, and convert every row.

    Fills ``report`` (format, columns, mapping, rows read, skipped rows); at least one sample is
    returned, or :class:`DataError` is raised.
    """
    try:
        records: Iterator[Record] = read_records(source, report, max_file_bytes=max_file_bytes, txt_split=txt_split)
        records = islice(records, limit)
        head = list(islice(records, _DETECT_ROWS))
        if not head:
            raise DataError(f"{report.source} holds no rows.")
        columns = _columns(row for _, row in head)
        if not columns:  # not one object among the first rows: say why, not "unknown layout"
            for where, row in head:
                report.rows_read += 1
                try:
                    _as_object(row)
                except RowSkip as skip:
                    report.skip(skip.reason, where)
            raise DataError(_no_usable_rows(report))
        fmt, resolved = resolve_format(columns, report.source, format, mapping)
        report.format, report.columns, report.mapping = fmt.name, columns, resolved
        report.kind = "text" if fmt is FORMATS["text"] else "chat"
        samples = []
        for where, row in chain(head, records):
            report.rows_read += 1
            try:
                samples.append(fmt.convert(_as_object(row), resolved, where))
            except RowSkip as skip:
                report.skip(skip.reason, where)
    except OSError as err:
        raise DataError(f"Could not read {report.source}: {err.strerror or err}.") from None
    if not samples:
        raise DataError(_no_usable_rows(report))
    return fmt, samples


def _as_object(row: Any) -> dict:
    if isinstance(row, RowSkip):
        raise row
    if isinstance(row, str):  # a JSON array (or JSON Lines) of plain strings: raw texts
        return {"text": row}
    if not isinstance(row, dict):
        raise RowSkip(f"a row is not an object (it is {type(row).__name__})")
    return row


def _columns(rows) -> list[str]:
    """Column names in first-seen order across the rows (rows need not all have the same keys)."""
    columns: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            columns.update(dict.fromkeys(str(key) for key in row))
        elif isinstance(row, str):
            columns["text"] = None
    return list(columns)


def _no_usable_rows(report: DataReport) -> str:
    reasons = "; ".join(report.skipped_lines()) or "none"
    read = f"{report.rows_read} row{'s' if report.rows_read != 1 else ''} read"
    return f"No usable rows in {report.source}: {read}, none can be trained on. Skipped: {reasons}."


def _display_name(source: str | os.PathLike) -> str:
    path = Path(source)
    return path.name if path.exists() else str(source)

"""Reading a dataset source into rows: a file, a folder, or a Hugging Face Hub dataset id.

Every reader yields ``(where, row)`` pairs, where ``where`` locates the row for messages ("line 17",
"row 3", "train.csv line 9") and ``row`` is a dict of columns -- or a :class:`RowSkip` for a row the
reader itself could not parse (a broken line in a JSON Lines file), so that the pipeline counts it
with all other skipped rows. Readers stream: memory use does not grow with the file size.

Files are read by this module rather than by ``datasets.load_dataset`` so that each problem gets a
precise message (line and column of invalid JSON, the encoding that was used, which row was bad)
and nothing is written to the Hugging Face cache. ``datasets`` is used where it is the right tool:
folders written by ``Dataset.save_to_disk`` and dataset ids on the Hub.

Formats (picked by file extension; Parquet also by content):

* ``.json``: an array of rows, or an object holding one list of rows (``{"data": [...]}``). A
  ``.json`` file that is really JSON Lines (one object per line) is read as such.
* ``.jsonl`` / ``.ndjson``: one JSON value per line; a line that is not valid JSON is skipped and
  counted, with its line and column.
* ``.csv`` / ``.tsv``: a header row, then one row per record. The CSV delimiter (``, ; tab |``) is
  the one that splits the header and the first records alike; a header that none splits makes a
  one-column file, whose records are read whole (commas in a text are text). A UTF-8 byte-order
  mark (as Excel writes) is removed.
* ``.parquet``: read in batches of rows.
* ``.txt``: raw text for continued pre-training. ``txt_split="blank_line"`` (default): documents
  are separated by one or more blank lines, so a paragraph or an article is one example;
  ``txt_split="line"``: every non-blank line is one example.
* A folder: a ``save_to_disk`` dataset (its ``train`` split), or else all data files in it; when
  some are named ``train*`` only those are read.
* ``owner/name`` that is not a local path: a Hub dataset's ``train`` split (needs network).
"""

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from lora_app.paths import offline

from .errors import DataError, RowSkip
from .jsonstream import TooDeep, iter_json_rows, loads, too_deep
from .sniff import HEAD_BYTES, check_size, detect_text_encoding, is_parquet, read_head

Record = tuple[str, Any]

SUFFIXES = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "txt",
}
TXT_SPLITS = ("blank_line", "line")
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SNIFF_LINE_CHARS = 1 << 20
_CSV_DELIMITERS = ",;\t|"
# The delimiter for a one-column CSV file: U+FFFF is a Unicode noncharacter, which never occurs in
# text, so the csv module (which needs some delimiter) reads each record whole, quotes undone.
_ONE_COLUMN = "\uffff"

# Long answers in CSV cells are normal for this data; the csv module's default cap is 128 KiB.
csv.field_size_limit(1 << 30)


def read_records(
    source: str | os.PathLike, report, *, max_file_bytes: int, txt_split: str = "blank_line"
) -> Iterator[Record]:
    """Yield ``(where, row)`` for every row of ``source`` (see the module docstring).

    Raises :class:`DataError` for a source that cannot be read at all. ``report`` receives notes
    (fallback encoding, ignored files).
    """
    if txt_split not in TXT_SPLITS:
        raise DataError(f"Unknown text split rule {txt_split!r}; choose one of {', '.join(TXT_SPLITS)}.")
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _read_folder(path, report, max_file_bytes, txt_split)
    elif path.is_file():
        check_size(path, path.stat().st_size, max_file_bytes)
        yield from _read_file(path, report, txt_split)
    elif _HUB_ID.match(str(source)):
        yield from _read_hub(str(source))
    else:
        raise DataError(f"{source} was not found: there is no such file or folder.")


def _read_file(path: Path, report, txt_split: str) -> Iterator[Record]:
    head = read_head(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if is_parquet(head):
        yield from _read_parquet(path)
        return
    if kind == "parquet":
        raise DataError(f"{path.name} is not a Parquet file (it does not start with the Parquet signature).")
    if kind is None:
        raise DataError(
            f"{path.name}: files of type {path.suffix or '(no extension)'!r} are not supported. "
            f"Use one of: {', '.join(SUFFIXES)}."
        )
    encoding, note = detect_text_encoding(path, head)
    if note:
        report.note(note)
    # newline="" lets the csv module see line breaks inside quoted fields as they are.
    with open(path, encoding=encoding, newline="" if kind in ("csv", "tsv") else None) as fh:
        if kind in ("json", "jsonl"):
            yield from _read_json(fh, path, report)
        elif kind in ("csv", "tsv"):
            yield from _read_csv(fh, path.name, "\t" if kind == "tsv" else None)
        else:
            yield from _read_txt(fh, txt_split)


def _read_json(fh: TextIO, path: Path, report) -> Iterator[Record]:
    if _is_json_lines(fh, jsonl_suffix=SUFFIXES[path.suffix.lower()] == "jsonl"):
        if path.suffix.lower() == ".json":
            report.note(f"{path.name} holds one JSON object per line; it was read as JSON Lines.")
        yield from _read_jsonl(fh, path.name)
    else:
        yield from _numbered(iter_json_rows(fh, path.name), "row")


def _is_json_lines(fh: TextIO, jsonl_suffix: bool) -> bool:
    """Tell JSON Lines from a JSON document by the first two non-blank lines, whatever the suffix.

    A ``.jsonl`` file is JSON Lines unless it plainly holds a (pretty-printed) array. A ``.json``
    file is JSON Lines when its first line is a complete object and the next line starts another.
    """
    lines = (line for line in iter(lambda: fh.readline(_SNIFF_LINE_CHARS), "") if line.strip())
    first, second = next(lines, ""), next(lines, "")
    fh.seek(0)
    try:
        first_value = loads(first)
    except (json.JSONDecodeError, TooDeep):  # the reader that follows reports what is wrong
        first_value = None
    if jsonl_suffix:
        return first_value is not None or not first.lstrip().startswith("[")
    return isinstance(first_value, dict) and second.lstrip().startswith("{")


def _read_jsonl(fh: TextIO, name: str) -> Iterator[Record]:
    """Rows, one per line; a line that is not valid JSON is skipped and counted.

    A line nested too deeply is not a bad row but a file that is not a dataset (or one built to
    crash readers), so it refuses the whole file.
    """
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", loads(line)
        except json.JSONDecodeError as err:
            yield f"line {number}, column {err.colno}: {err.msg}", RowSkip("invalid JSON")
        except TooDeep:
            raise too_deep(f"{name} line {number}") from None


def _read_csv(fh: TextIO, name: str, delimiter: str | None) -> Iterator[Record]:
    if delimiter is None:
        delimiter = _sniff_delimiter(fh.read(HEAD_BYTES))
        fh.seek(0)
    reader = csv.DictReader(fh, delimiter=delimiter)
    try:
        if not reader.fieldnames:
            raise DataError(f"{name} is empty: it has no header row.")
        reader.fieldnames = [column.strip() for column in reader.fieldnames]
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row:  # DictReader files surplus values under the key None
                yield where, RowSkip("more values than columns in the header")
            else:
                yield where, row
    except csv.Error as err:
        raise DataError(f"{name} is not valid CSV: {err} (line {reader.line_num}).") from None


def _sniff_delimiter(sample: str) -> str:
    """The delimiter of a CSV sample; ``_ONE_COLUMN`` when none splits the header.

    Each candidate is tried with the CSV parser itself, so quoted fields holding other delimiters,
    quotes or line breaks are read right (``csv.Sniffer`` guesses from quote patterns and picks ``,``
    for a ``;`` file with ``"a ""quoted"", text"`` in it). The winner splits the header into two
    or more columns and the most records into as many columns as the header; ties go to the one
    giving more columns. A header that no candidate splits names the only column, so commas or
    semicolons in the records are part of their text, not delimiters.
    """
    complete_lines = sample[: sample.rfind("\n") + 1] or sample
    best, best_score = _ONE_COLUMN, (0, 0)
    for delimiter in _CSV_DELIMITERS:
        try:
            records = [r for r in csv.reader(io.StringIO(complete_lines), delimiter=delimiter) if r]
        except csv.Error:
            continue
        width = len(records[0]) if records else 0
        score = (sum(len(r) == width for r in records[1:]), width)
        if width > 1 and score > best_score:
            best, best_score = delimiter, score
    return best


def _read_txt(fh: TextIO, split: str) -> Iterator[Record]:
    if split == "line":
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield f"line {number}", {"text": line.rstrip("\n")}
        return
    document: list[str] = []
    start = 0
    for number, line in enumerate(fh, 1):
        if line.strip():
            start = start if document else number
            document.append(line)
        elif document:
            yield f"line {start}", {"text": "".join(document).rstrip("\n")}
            document = []
    if document:
        yield f"line {start}", {"text": "".join(document).rstrip("\n")}


def _read_parquet(path: Path) -> Iterator[Record]:
    # pyarrow and datasets take seconds to import; most datasets are JSON or CSV and never need them
    import pyarrow
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        yield from _numbered((row for batch in batches for row in batch.to_pylist()), "row")
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{path.name} is not a readable Parquet file: {err}") from None


def _read_folder(folder: Path, report, max_file_bytes: int, txt_split: str) -> Iterator[Record]:
    if any((folder / marker).exists() for marker in _SAVED_DATASET_MARKERS):
        yield from _read_saved_dataset(folder)
        return
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DataError(f"The folder {folder.name} holds no data files ({', '.join(SUFFIXES)}).")
    train = [p for p in files if p.stem.lower().startswith("train")]
    if train and len(train) < len(files):
        ignored = ", ".join(p.name for p in files if p not in train)
        report.note(f"Only the training files in {folder.name} were read; {ignored} were ignored.")
        files = train
    check_size(folder, sum(p.stat().st_size for p in files), max_file_bytes)
    for path in files:
        prefix = path.relative_to(folder).as_posix()
        for where, row in _read_file(path, report, txt_split):
            yield f"{prefix} {where}", row


def _read_saved_dataset(folder: Path) -> Iterator[Record]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as err:
        raise DataError(f"{folder.name} looks like a saved Hugging Face dataset but could not be loaded: {err}") from None
    yield from _numbered(_train_split(dataset, folder.name), "row")


def _read_hub(repo_id: str) -> Iterator[Record]:
    """Stream the train split of a Hub dataset; every failure (network, auth, config) is a DataError."""
    import datasets

    try:
        dataset = datasets.load_dataset(repo_id, streaming=True)
        yield from _numbered(_train_split(dataset, repo_id), "row")
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 -- network and Hub failures come in many types
        hint = " The app is offline (HF_HUB_OFFLINE is set): use a local file." if offline() else ""
        raise DataError(
            f"{repo_id} is not a local file or folder, and loading it as a Hugging Face Hub dataset "
            f"failed: {err}.{hint}"
        ) from None


def _train_split(dataset, name: str):
    """The rows to train on from a dataset or a dict of splits: ``train``, or the only split."""
    if not hasattr(dataset, "keys"):
        return dataset
    splits = list(dataset.keys())
    if "train" in splits:
        return dataset["train"]
    if len(splits) == 1:
        return dataset[splits[0]]
    raise DataError(f"{name} has the splits {', '.join(splits)} and none is called 'train'.")


def _numbered(rows: Iterable[Any], unit: str) -> Iterator[Record]:
    for number, row in enumerate(rows, 1):
        yield f"{unit} {number}", row

"""Looking at a file before parsing it: size, emptiness, binary content and text encoding.

Each check turns a confusing downstream failure (a parser choking on a ZIP file, a UnicodeDecodeError
halfway through a CSV, a 5 GB file filling memory) into one clear message up front. The checks read
the file in fixed-size chunks, so they cost memory independent of the file size.
"""

import codecs
from pathlib import Path

from .errors import DataError

HEAD_BYTES = 64 * 1024
CHUNK_BYTES = 1024 * 1024

# Leading bytes of formats people drop in by mistake, with what to do instead.
_MAGIC = [
    (b"PK\x03\x04", "a ZIP archive (an Excel .xlsx or Word .docx file is one too): unpack it, or export the sheet as CSV"),
    (b"\x1f\x8b", "a gzip-compressed file: decompress it first"),
    (b"%PDF", "a PDF document: export its text to a .txt file first"),
    (b"\x89PNG", "a PNG image, not a dataset"),
    (b"\xff\xd8\xff", "a JPEG image, not a dataset"),
    (b"SQLite format 3", "an SQLite database: export a table as CSV or JSON Lines"),
]
_BOMS = [  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
]
# Tried in order when a file is not valid UTF-8: Windows-1252 is what spreadsheet exports on
# Western-language Windows produce; Latin-1 decodes any byte, so it is the last resort.
_FALLBACK_ENCODINGS = ["cp1252", "latin-1"]

PARQUET_MAGIC = b"PAR1"
# Control bytes that never occur in text (everything below 0x20 except \b \t \n \f \r ESC, and
# DEL); more than this share of them in a file's head means it is binary.
_BINARY_CONTROLS = bytes(c for c in [*range(0x20), 0x7F] if c not in b"\b\t\n\f\r\x1b")
BINARY_CONTROL_SHARE = 0.05


def human_size(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``: sizes in messages, readable at a glance."""
    if n < 1024:
        return f"{n} bytes"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def check_size(path: Path, size: int, max_bytes: int) -> None:
    """Refuse a file (or folder total) over the limit, before reading any of it."""
    if size > max_bytes:
        raise DataError(
            f"{path.name} is {human_size(size)}, over the {human_size(max_bytes)} limit for a dataset. "
            "Use a smaller sample of it, or raise the file size limit (max_file_bytes)."
        )


def read_head(path: Path) -> bytes:
    """The first bytes of a file; an empty file is an error right away."""
    with open(path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
    if not head:
        raise DataError(f"{path.name} is empty (0 bytes).")
    if len(head) < HEAD_BYTES and not head.strip():
        raise DataError(f"{path.name} is empty (only whitespace).")
    return head


def is_parquet(head: bytes) -> bool:
    return head.startswith(PARQUET_MAGIC)


def detect_text_encoding(path: Path, head: bytes) -> tuple[str, str | None]:
    """The encoding to read a text file with, and a note for the user when it is not UTF-8.

    A byte-order mark decides. Otherwise the whole file is checked as UTF-8 chunk by chunk (an
    incremental decoder, so memory stays bounded and a bad byte deep in a large file is still
    found before parsing starts); when it is not UTF-8 the first fallback encoding that decodes
    the file is used, and the note says so and where the first non-UTF-8 byte is.
    Raises :class:`DataError` for binary files.
    """
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding, None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise DataError(f"{path.name} is {what}.")
    why = _binary_evidence(head)
    if why:
        raise DataError(
            f"{path.name} looks like a binary file ({why}), not text. "
            "Datasets must be JSON, JSON Lines, CSV/TSV, Parquet or plain text."
        )
    bad_line = _first_undecodable_line(path, "utf-8")
    if bad_line is None:
        return "utf-8-sig", None  # utf-8-sig also strips a BOM-less file unchanged
    for encoding in _FALLBACK_ENCODINGS:
        if _first_undecodable_line(path, encoding) is None:
            name = codecs.lookup(encoding).name
            return encoding, (
                f"{path.name} is not valid UTF-8 (first bad byte on line {bad_line}); it was read as "
                f"{name}. Check accented characters in the preview, or save the file as UTF-8."
            )
    raise AssertionError("latin-1 decodes every byte")


def _binary_evidence(head: bytes) -> str | None:
    """Why ``head`` cannot be the start of a text file, or ``None`` if it can.

    Text never holds NUL bytes, and hardly any other control characters (tab, line breaks, form
    feed and escape aside) in any 8-bit or UTF-8 encoding; a file where they are common is binary.
    """
    if b"\x00" in head:
        return "it contains NUL bytes"
    controls = len(head) - len(head.translate(None, _BINARY_CONTROLS))
    if controls > BINARY_CONTROL_SHARE * len(head):
        return f"{controls} of its first {len(head)} bytes are control characters"
    return None


def _first_undecodable_line(path: Path, encoding: str) -> int | None:
    """The 1-based line of the first byte ``encoding`` cannot decode, or ``None`` if it all decodes."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line = 1
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return line + chunk.count(b"\n", 0, err.start)
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return line
    return None

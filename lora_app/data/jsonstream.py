"""Streaming the rows out of a JSON document without loading the document whole.

``json.load`` needs the whole file in memory, several times over once parsed. A dataset file is
nearly always ``[row, row, ...]`` or ``{"data": [row, row, ...], "version": ...}``, so this module
walks that outer structure itself and hands each row to :func:`json.JSONDecoder.raw_decode`, keeping
only a window of the file in memory. Errors carry the line and column in the file, like ``json``'s.

Every JSON value read for a dataset (a row here, a JSON Lines line, a list held as JSON text in a CSV
cell) is decoded with :func:`loads` or :meth:`JsonStream.value`, which refuse values nested more than
``MAX_DEPTH`` levels: ``json`` recurses once per level, so a file nested a few thousand levels deep
would otherwise end in a RecursionError, and a value just under Python's limit would crash whatever
walks it next.
"""

import json
import re
from collections.abc import Iterator
from typing import Any, TextIO

from .errors import DataError

CHUNK_CHARS = 1 << 20
# A single row larger than this is treated as malformed rather than read on and on.
MAX_ROW_CHARS = 64 << 20

# Dataset rows need a handful of levels (row > messages > turn > content parts > tool arguments);
# this leaves room for deep tool arguments and stays far below Python's recursion limit.
MAX_DEPTH = 100

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class TooDeep(ValueError):
    """A JSON value is nested more than ``MAX_DEPTH`` levels deep."""


def too_deep(where: str) -> DataError:
    """The error for a file (``where``: its name, or its name and a line) holding a value nested too deeply."""
    return DataError(
        f"{where} is nested too deeply (more than {MAX_DEPTH} levels of lists and objects) — flatten it: "
        "a dataset row needs only a few levels."
    )


def loads(text: str) -> Any:
    """``json.loads``, raising :class:`TooDeep` for a value nested more than ``MAX_DEPTH`` levels."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise TooDeep from None
    _check_depth(value, text, 0, len(text))
    return value


def _check_depth(value: Any, text: str, start: int, end: int) -> None:
    """Raise :class:`TooDeep` if ``value``, decoded from ``text[start:end]``, is nested too deeply.

    A value cannot be deeper than its text has opening brackets, so almost every row is passed by
    two fast counts. Only a row with many brackets is walked, with a stack of its own: recursion is
    what fails on deep values.
    """
    if text.count("[", start, end) + text.count("{", start, end) <= MAX_DEPTH:
        return
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                raise TooDeep
            stack.extend((item, depth + 1) for item in (node.values() if isinstance(node, dict) else node))


class JsonStream:
    """A cursor over JSON text read from ``fh`` in chunks; ``name`` is used in error messages."""

    def __init__(self, fh: TextIO, name: str):
        self.fh, self.name = fh, name
        self.buf, self.pos, self.eof = "", 0, False
        self.line0, self.col0 = 1, 1  # where buf[0] is in the file

    def _fill(self) -> None:
        """Drop the consumed text (keeping track of its lines) and read the next chunk."""
        consumed = self.buf[: self.pos]
        newlines = consumed.count("\n")
        if newlines:
            self.line0 += newlines
            self.col0 = len(consumed) - consumed.rfind("\n")
        else:
            self.col0 += len(consumed)
        data = self.fh.read(CHUNK_CHARS)
        self.eof = not data
        self.buf, self.pos = self.buf[self.pos :] + data, 0

    def error(self, message: str, index: int) -> DataError:
        before = self.buf[:index]
        newlines = before.count("\n")
        line = self.line0 + newlines
        col = index - before.rfind("\n") if newlines else self.col0 + index
        return DataError(f"{self.name} is not valid JSON: {message} at line {line}, column {col}.")

    def peek(self) -> str:
        """The next non-whitespace character without consuming it; ``""`` at the end of the file."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return ""
            self._fill()

    def expect(self, allowed: str, what: str) -> str:
        """Consume one of the ``allowed`` characters, or fail saying ``what`` was expected."""
        char = self.peek()
        if not char or char not in allowed:
            raise self.error(f"expected {what}", self.pos)
        self.pos += 1
        return char

    def value(self) -> Any:
        """Decode the next complete JSON value, reading more of the file until it is complete."""
        self.peek()
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                if self.eof or len(self.buf) - self.pos > MAX_ROW_CHARS:
                    raise self.error(err.msg, err.pos) from None
            except RecursionError:
                raise too_deep(self.name) from None
            else:
                # A value ending exactly at the end of the window may be cut ("12" of "123").
                if end < len(self.buf) or self.eof:
                    try:
                        _check_depth(obj, self.buf, self.pos, end)
                    except TooDeep:
                        raise too_deep(self.name) from None
                    self.pos = end
                    return obj
            self._fill()

    def array(self) -> Iterator[Any]:
        """Yield the items of the array that starts at the cursor."""
        self.expect("[", "'['")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            if self.expect(",]", "',' or ']'") == "]":
                return

    def end(self) -> None:
        """Fail if anything but whitespace follows the top-level value."""
        if self.peek():
            raise self.error("extra data after the end of the document", self.pos)


def iter_json_rows(fh: TextIO, name: str) -> Iterator[Any]:
    """Yield the rows of a JSON document: a top-level array, or an object holding exactly one list.

    In the object form, keys whose values are not lists (``"version": 2``) are ignored; a second
    list is an error, since it is impossible to tell which one holds the rows.
    """
    stream = JsonStream(fh, name)
    first = stream.peek()
    if first == "[":
        yield from stream.array()
    elif first == "{":
        yield from _rows_in_object(stream)
    elif not first:
        raise DataError(f"{name} is empty (only whitespace).")
    else:
        raise stream.error("expected an array '[' or an object '{' at the start", stream.pos)
    stream.end()


def _rows_in_object(stream: JsonStream) -> Iterator[Any]:
    stream.expect("{", "'{'")
    list_key = None
    if stream.peek() == "}":
        stream.pos += 1
    else:
        while True:
            if stream.peek() != '"':
                raise stream.error("expected a key in double quotes", stream.pos)
            key = stream.value()
            stream.expect(":", "':' after a key")
            if stream.peek() != "[":
                stream.value()
            elif list_key is None:
                list_key = key
                yield from stream.array()
            else:
                raise DataError(
                    f"{stream.name} holds more than one list ({list_key!r} and {key!r}), so it is unclear "
                    "which one holds the rows. Keep one list per file; a validation set can be a second file."
                )
            if stream.expect(",}", "',' or '}'") == "}":
                break
    if list_key is None:
        raise DataError(
            f"{stream.name} is a JSON object without a list of rows. Expected an array of rows, "
            'an object such as {"data": [...]}, or JSON Lines (one object per line, in a .jsonl file).'
        )

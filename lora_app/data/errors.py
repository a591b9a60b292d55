"""The two ways a data problem is reported: a whole-dataset error, or a skipped row.

A problem that stops the dataset from being used at all (file missing, unreadable, invalid JSON,
unknown schema, no usable rows...) raises :class:`DataError`, whose message is written for the person
who dropped the file in: the UI shows ``str(err)`` as is, so it says what is wrong and what to do.

A problem with one row (a missing field, a conversation without an assistant turn...) raises
:class:`RowSkip` inside the pipeline, which catches it and counts the row in the
:class:`~lora_app.data.report.DataReport` under the reason, so one bad row never sinks a dataset and
no row disappears without being counted.
"""

from lora_app.errors import DataError


class RowSkip(Exception):
    """One row cannot be used; ``reason`` is a short, row-independent text used to count such rows."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

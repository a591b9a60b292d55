"""What happened to a dataset on its way in: the numbers the UI shows next to the preview."""

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class DataReport:
    """Counts and facts gathered while a dataset is read, mapped, split and tokenized.

    ``skipped`` counts dropped rows per reason ("missing 'output'", "no assistant turn", ...) and
    ``first_skipped_at`` says where the first such row is ("line 17", "row 3"), so the user can
    find and fix it. ``notes`` are things the user should know that are not row problems (a
    fallback encoding, a template choice made for them, files in a folder that were ignored).
    """

    source: str = ""
    format: str = ""
    kind: str = ""  # "chat" (trained on assistant turns) or "text" (trained on everything)
    columns: list[str] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict)  # format field -> source column
    template: str = ""
    template_system: str | None = None  # the system prompt the template adds where a conversation has none
    system_prompts: Counter = field(default_factory=Counter)  # examples per source of their system prompt
    rows_read: int = 0
    train_rows: int = 0
    val_rows: int = 0
    truncated: int = 0
    seq_len: int = 0
    packed_sequences: int | None = None
    skipped: Counter = field(default_factory=Counter)
    first_skipped_at: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        """Count one dropped row under ``reason``; remember where the first one was."""
        self.skipped[reason] += 1
        self.first_skipped_at.setdefault(reason, where)

    def note(self, text: str) -> None:
        """Record something the user should know, once."""
        if text not in self.notes:
            self.notes.append(text)

    def merge(self, other: "DataReport", label: str) -> None:
        """Add the rows and skips of another source (the validation file), reasons prefixed by ``label``."""
        self.rows_read += other.rows_read
        for reason, count in other.skipped.items():
            self.skipped[f"{label}: {reason}"] += count
            self.first_skipped_at.setdefault(f"{label}: {reason}", other.first_skipped_at[reason])
        for text in other.notes:
            self.note(text)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def skipped_lines(self) -> list[str]:
        """One line per reason, most frequent first: ``"3 rows: missing 'output' (first at line 5)"``."""
        return [
            f"{count} row{'s' if count != 1 else ''}: {reason} (first at {self.first_skipped_at[reason]})"
            for reason, count in self.skipped.most_common()
        ]

"""The validation split: a deterministic fraction of the rows, chosen under a seed."""

import math
import random
from collections.abc import Sequence
from typing import TypeVar

from .errors import DataError

T = TypeVar("T")


def split_rows(rows: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """``(train, val)``: ``fraction`` of the rows, at least one, picked at random under ``seed``.

    Both parts keep the file's order, so the same file, fraction and seed always give the same
    split (training shuffles on its own). At least one row stays in train; with fewer than two
    rows there is no validation set.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"The validation fraction must be at least 0 and below 1, not {fraction}.")
    n_val = min(max(1, math.floor(len(rows) * fraction + 0.5)), len(rows) - 1) if fraction > 0 else 0
    if n_val <= 0:
        return list(rows), []
    chosen = set(random.Random(seed).sample(range(len(rows)), n_val))
    train = [row for i, row in enumerate(rows) if i not in chosen]
    val = [row for i, row in enumerate(rows) if i in chosen]
    return train, val

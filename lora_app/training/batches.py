"""Which examples go into which batch, deterministically under (seed, epoch).

Three ways to batch (the ``batching`` setting):

    grouped   rows of similar length share a batch, so little compute goes to padding. Like
              transformers' ``group_by_length``, the shuffled rows are cut into mega-batches of
              ``50 * batch_size``, each sorted by length and cut into batches, and the batches are
              shuffled. Unlike it, the sort key is each row's length times a random factor drawn
              anew every epoch (within ±``JITTER``): a small dataset is a single mega-batch, and a
              plain sort would put the same rows together in every epoch, which measurably hurts
              the held-out loss (bench/bench_parity.py).
    random    random batches, as transformers' Trainer draws them.
    packed    short rows concatenated up to the sequence length at data preparation (see
              ``lora_app.data.packing``); the packed sequences are batched at random.

The plan depends only on (lengths, batch size, seed, epoch), which is what lets a resumed run see
exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import random

from lora_app.data.packing import pack_groups

MEGA_BATCH = 50
JITTER = 0.2


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, grouped: bool = True,
                 shard: tuple[int, int] = (0, 1)) -> list[list[int]]:
    """Lists of example indices, one per batch, for one epoch.

    ``shard = (rank, world)`` gives process ``rank`` its share under data parallelism; every
    process gets the same number of batches (the last few are dropped when they don't divide).
    """
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if grouped:
        key = {i: lengths[i] * rng.uniform(1 - JITTER, 1 + JITTER) for i in order}
        mega = batch_size * MEGA_BATCH
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda i: -key[i])]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if grouped:
        rng.shuffle(batches)
    rank, world = shard
    if world > 1:
        usable = len(batches) // world * world
        batches = batches[rank:usable:world]
    return batches


def padding_share(lengths: list[int], batch_size: int, batching: str, seq_len: int, seed: int = 0) -> float:
    """The share of an epoch's padded tokens that are padding under ``batching`` (lengths after truncation)."""
    if batching == "packed":
        lengths = [sum(lengths[i] for i in group) for group in pack_groups(lengths, seq_len)]
    batches = plan_batches(lengths, batch_size, seed, epoch=0, grouped=batching == "grouped")
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - sum(lengths) / padded if padded else 0.0


def split_by_tokens(indices: list[int], lengths: list[int], batch_size: int, budget: int) -> list[list[int]]:
    """Cut one optimizer step's examples into micro-batches of at most ``batch_size`` examples and
    (when ``budget`` > 0) at most ``budget`` tokens after padding, longest first so that examples of
    similar length share a micro-batch. Gradients are normalised by the step's token count, so the
    step's update does not depend on the cut; only peak memory does."""
    order = sorted(indices, key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        if chunks:
            chunk = chunks[-1]
            width = max(lengths[chunk[0]], lengths[i])
            if len(chunk) < batch_size and (budget <= 0 or width * (len(chunk) + 1) <= budget):
                chunk.append(i)
                continue
        chunks.append([i])
    return chunks


def padded_width(lengths: list[int], multiple: int, limit: int | None = None) -> int:
    """The width rows of these lengths are padded to in one batch: the longest, rounded up to a
    multiple of ``multiple``, but not past ``limit`` (the sequence length) unless the longest is."""
    longest = max(lengths)
    rounded = -(-longest // multiple) * multiple
    return max(longest, rounded if limit is None else min(rounded, limit))


class StepPlan:
    """Which examples each optimizer step trains on: ``grad_accum`` batches of the epoch plans, re-cut
    into micro-batches under the token budget. Depends only on the step number, so a resumed run
    sees exactly the batches it would have seen. ``shrink`` halves the micro-batches after an
    out-of-memory error: each step keeps its examples, so its update stays the same. A micro-batch is
    padded to ``padded_width`` (a multiple of ``width_multiple``, not past ``limit``)."""

    def __init__(self, lengths: list[int], batch_size: int, grad_accum: int, seed: int, grouped: bool,
                 shard: tuple[int, int], token_budget: int, width_multiple: int = 1, limit: int | None = None):
        self.lengths, self.batch_size, self.grad_accum, self.seed = lengths, batch_size, grad_accum, seed
        self.grouped, self.shard, self.token_budget = grouped, shard, token_budget
        self.width_multiple, self.limit = width_multiple, limit
        self.micro_size = batch_size  # examples per micro-batch
        self.batches_per_epoch = len(self._epoch(0))
        self.steps_per_epoch = max(1, self.batches_per_epoch // grad_accum)

    @functools.lru_cache(maxsize=2)  # a step's micro-batches span at most two epochs
    def _epoch(self, epoch: int) -> list[list[int]]:
        return plan_batches(self.lengths, self.batch_size, self.seed, epoch, self.grouped, self.shard)

    def largest_micro_batch(self) -> int:
        """Padded tokens of the largest micro-batch of the first epoch (what activation memory follows)."""
        return max((len(chunk) * self.padded_width([self.lengths[i] for i in chunk])
                    for step in range(self.steps_per_epoch) for chunk in self.micro_batches(step)), default=0)

    def padded_width(self, lengths: list[int]) -> int:
        """The width a batch of rows of these lengths (training or validation) is padded to."""
        return padded_width(lengths, self.width_multiple, self.limit)

    def micro_batches(self, step: int) -> list[list[int]]:
        """Example indices of each micro-batch of optimizer step ``step`` (0-based)."""
        indices = []
        for index in range(step * self.grad_accum, (step + 1) * self.grad_accum):
            epoch, position = divmod(index, self.batches_per_epoch)
            indices += self._epoch(epoch)[position]
        return split_by_tokens(indices, self.lengths, self.micro_size, self.token_budget)

    def shrink(self, step: int) -> tuple[int, int] | None:
        """Halve the micro-batches (examples and token budget) because those of ``step`` did not fit:
        (examples in its largest micro-batch before, after), or None when they are single examples."""
        before = max(map(len, self.micro_batches(step)))
        if before == 1:
            return None
        self.micro_size = max(1, before // 2)
        self.token_budget //= 2
        return before, max(map(len, self.micro_batches(step)))

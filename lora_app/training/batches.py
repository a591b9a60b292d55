"""Which examples go into which batch, deterministically under (seed, epoch).

Random batches of chat data waste much of their compute on padding: alpaca rows range from a few
dozen to several hundred tokens, and a batch is padded to its longest row. Like transformers'
``group_by_length``, we shuffle, cut the shuffled order into mega-batches of ``50 * batch_size``,
sort each by length and cut it into batches, then shuffle the batches: rows of similar length
share a batch, and the order stays random. The plan depends only on (lengths, batch size, seed,
epoch), which is what lets a resumed run see exactly the batches it would have seen.
"""

from __future__ import annotations

import functools

import torch

MEGA_BATCH = 50


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                 shard: tuple[int, int] = (0, 1)) -> list[list[int]]:
    """Lists of example indices, one per batch, for one epoch.

    ``shard = (rank, world)`` gives process ``rank`` its share under data parallelism; every
    process gets the same number of batches (the last few are dropped when they don't divide).
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        mega = batch_size * MEGA_BATCH
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda i: -lengths[i])]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    rank, world = shard
    if world > 1:
        usable = len(batches) // world * world
        batches = batches[rank:usable:world]
    return batches


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


class StepPlan:
    """Which examples each optimizer step trains on: ``grad_accum`` batches of the epoch plans, re-cut
    into micro-batches under the token budget. Depends only on the step number, so a resumed run
    sees exactly the batches it would have seen."""

    def __init__(self, lengths: list[int], batch_size: int, grad_accum: int, seed: int, group_by_length: bool,
                 shard: tuple[int, int], token_budget: int):
        self.lengths, self.batch_size, self.grad_accum, self.seed = lengths, batch_size, grad_accum, seed
        self.group_by_length, self.shard, self.token_budget = group_by_length, shard, token_budget
        self.batches_per_epoch = len(self._epoch(0))
        self.steps_per_epoch = max(1, self.batches_per_epoch // grad_accum)

    @functools.lru_cache(maxsize=2)  # a step's micro-batches span at most two epochs
    def _epoch(self, epoch: int) -> list[list[int]]:
        return plan_batches(self.lengths if self.group_by_length else [0] * len(self.lengths), self.batch_size,
                            self.seed, epoch, self.group_by_length, self.shard)

    def largest_micro_batch(self) -> int:
        """Padded tokens of the largest micro-batch of the first epoch (what activation memory follows)."""
        return max((len(chunk) * max(self.lengths[i] for i in chunk)
                    for step in range(self.steps_per_epoch) for chunk in self.micro_batches(step)), default=0)

    def micro_batches(self, step: int) -> list[list[int]]:
        """Example indices of each micro-batch of optimizer step ``step`` (0-based)."""
        indices = []
        for index in range(step * self.grad_accum, (step + 1) * self.grad_accum):
            epoch, position = divmod(index, self.batches_per_epoch)
            indices += self._epoch(epoch)[position]
        return split_by_tokens(indices, self.lengths, self.batch_size, self.token_budget)

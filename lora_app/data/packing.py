"""Packing short examples into long sequences, and keeping packed examples apart.

**What packing does.** :func:`pack_examples` concatenates consecutive examples (in order) into
sequences of at most ``seq_len`` tokens, so a batch holds few padding tokens. Each packed
sequence carries ``position_ids`` that restart at 0 where each example starts; the first label of
every example is ``-100``, so no token is trained to follow the end of the previous example.

**Keeping examples apart.** Attention must not cross from one example into another. With
transformers 5 this happens inside the model: when a forward call gets ``position_ids`` and *no*
``attention_mask`` and no cache (``use_cache=False``), the model derives the example boundaries from
the restarts in ``position_ids`` and builds a block-diagonal causal mask -- for the eager, SDPA,
flash and flex attention paths alike (``transformers.masking_utils.find_packed_sequence_indices``).
Passing an ``attention_mask`` switches that off, which is why ``collate`` (:mod:`~lora_app.data.tensors`)
returns none for packed batches. A model that ignores ``position_ids`` would let packed examples
attend to each other: only positions would be right.
"""

from .encode import IGNORE_INDEX


def pack_groups(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Which consecutive examples share a packed sequence: greedily, at most ``seq_len`` tokens each."""
    groups: list[list[int]] = []
    used = 0
    for i, length in enumerate(lengths):
        if not groups or used + length > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += length
    return groups


def pack_examples(examples: list[dict[str, list[int]]], seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate consecutive examples into sequences of at most ``seq_len`` tokens (``pack_groups``).

    Examples are never split (they are already truncated to ``seq_len``); order is kept, so
    packing is deterministic. Each result has ``input_ids``, ``labels`` and ``position_ids``.
    """
    packed = []
    for group in pack_groups([len(example["input_ids"]) for example in examples], seq_len):
        members = [examples[i] for i in group]
        packed.append({"input_ids": [t for e in members for t in e["input_ids"]],
                       "labels": [t for e in members for t in [IGNORE_INDEX] + e["labels"][1:]],
                       "position_ids": [p for e in members for p in range(len(e["input_ids"]))]})
    return packed

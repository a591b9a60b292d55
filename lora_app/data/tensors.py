"""Examples to a padded batch of tensors: the one part of the data layer that needs torch."""

import torch

from .encode import IGNORE_INDEX


def collate(examples: list[dict[str, list[int]]], pad_token_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch on the right to ``width`` (default: its longest sequence); labels are -100 on padding.

    Unpacked examples get an ``attention_mask`` (1 on tokens, 0 on padding). Packed examples get
    ``position_ids`` instead and no attention mask (see :mod:`~lora_app.data.packing`); their padding is
    numbered as one more example (0, 1, 2, ...) so it stays in a block of its own.
    """
    longest = max(len(example["input_ids"]) for example in examples)
    if width is not None and width < longest:
        raise ValueError(f"cannot pad a batch whose longest row has {longest} tokens to {width}")
    width = longest if width is None else width
    packed = "position_ids" in examples[0]
    batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids" if packed else "attention_mask": []}
    for example in examples:
        n = len(example["input_ids"])
        pad = width - n
        batch["input_ids"].append(example["input_ids"] + [pad_token_id] * pad)
        batch["labels"].append(example["labels"] + [IGNORE_INDEX] * pad)
        if packed:
            batch["position_ids"].append(example["position_ids"] + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * n + [0] * pad)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


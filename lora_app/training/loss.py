"""Cross-entropy on the output head without the (batch x seq x vocab) logits tensor.

The usual recipe computes fp32 logits for every position of the batch (for SmolLM2 with a 49k
vocabulary, 8 x 512 tokens make 800 MB, and autograd keeps as much again), then throws most away:
padding and prompt positions carry no label. Here only positions with a label are projected, a chunk
at a time, and the gradient with respect to the hidden states is computed in the same pass,

    dL/dh = (softmax(h W^T) - onehot(y)) W / N,

so neither logits nor their gradient outlive a chunk. The head weight is frozen in LoRA training, so
no weight gradient is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_app.lora.functional import compute_dtype

IGNORE_INDEX = -100
GPU_CHUNK = 1024  # labelled positions projected onto the vocabulary at once on a GPU
# On a CPU, a chunk's workspaces (its logits in the product's dtype and in fp32) stay within this: the
# passes over them (cast, log-softmax, softmax, cast back) then run in cache rather than from memory,
# and the workspaces come back from the allocator without fresh pages. On a 2-core AVX512-BF16 EPYC
# the loss took 0.56 ms a labelled row in a bf16 training step with 1024-row chunks, 0.25 with 170
# rows; fp32 products are bound by the arithmetic and lose a little below 256 rows.
CPU_CHUNK_BYTES = 48 * 2**20
# The rows projected at once are a multiple of this (the last chunk padded with zero rows, whose loss and
# gradient are dropped): on a CPU in bf16, oneDNN keeps memory for every product shape it meets, and the
# labelled positions of a micro-batch are a new count almost every step.
ROW_MULTIPLE = 16


def workspace_row_bytes(vocab: int, dtype: torch.dtype) -> int:
    """Bytes of the loss's workspaces per projected position, for products in ``dtype``: the logits in
    ``dtype`` and fp32 log-probabilities (one buffer when ``dtype`` is fp32)."""
    return vocab * (4 if dtype == torch.float32 else 4 + dtype.itemsize)


def chunk_rows(vocab: int, device: torch.device, dtype: torch.dtype) -> int:
    """Labelled positions projected onto the vocabulary at once, for products in ``dtype``."""
    if device.type != "cpu":
        return GPU_CHUNK
    return max(ROW_MULTIPLE, CPU_CHUNK_BYTES // workspace_row_bytes(vocab, dtype) // ROW_MULTIPLE * ROW_MULTIPLE)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        dtype = compute_dtype(hidden, weight)  # the head's product runs where autocast would run it
        weight = weight.to(dtype)
        n, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
        padded = -(-n // ROW_MULTIPLE) * ROW_MULTIPLE
        if padded > n:
            hidden = torch.cat([hidden, hidden.new_zeros(padded - n, hidden.shape[1])])
            targets = torch.cat([targets, targets.new_zeros(padded - n)])
        rows = min(padded, chunk_size)
        # two workspaces that every chunk reuses: the product in its dtype, and fp32 log-probabilities
        # (computed in place, then turned into the softmax in place)
        logits = torch.empty((rows, vocab), dtype=dtype, device=device)
        log_probs = logits if dtype == torch.float32 else torch.empty((rows, vocab), dtype=torch.float32, device=device)
        grad = torch.empty((padded, hidden.shape[1]), dtype=dtype, device=device) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=device)
        with torch.autocast(device.type, enabled=False):  # out= products: every operand is cast already
            for start in range(0, padded, chunk_size):
                h = hidden[start:start + chunk_size].to(dtype)
                y = targets[start:start + chunk_size]
                m = len(y)
                torch.mm(h, weight.T, out=logits[:m])
                lp = log_probs[:m]
                if lp is not logits:
                    lp.copy_(logits[:m])
                if bias is not None:
                    lp += bias.float()
                torch.log_softmax(lp, dim=-1, out=lp)
                valid = max(n - start, 0)  # the padding rows carry no loss
                total -= lp[:valid].gather(1, y[:valid, None]).sum()
                if grad is not None:
                    probs = lp.exp_()
                    probs[torch.arange(m, device=device), y] -= 1.0
                    if probs is not logits:
                        probs = logits[:m].copy_(probs)
                    torch.mm(probs, weight, out=grad[start:start + m])
        ctx.save_for_backward(grad[:n].to(hidden.dtype) if grad is not None else hidden.new_empty(0))
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * (grad_output / ctx.n).to(grad.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of ``hidden`` (batch, seq, d) through the head ``weight`` (vocab, d)
    against ``labels`` (batch, seq) in the transformers convention (position t predicts labels[t+1];
    -100 is ignored). Returns (loss, number of predicted tokens)."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    selected = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    chunk_size = chunk_size or chunk_rows(weight.shape[0], hidden.device, compute_dtype(hidden, weight))
    return _LinearCrossEntropy.apply(selected, weight.detach(), None if bias is None else bias.detach(),
                                     targets[keep], chunk_size), count


def reference_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain computation, for tests: full logits, shift, mean over labelled positions."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)

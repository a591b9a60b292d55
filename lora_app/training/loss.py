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

IGNORE_INDEX = -100
CHUNK = 1024  # labelled positions projected onto the vocabulary at once (fp32 logits: CHUNK x vocab x 4 bytes)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n = hidden.shape[0]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            logits = (h @ weight.T).float()
            if bias is not None:
                logits += bias.float()
            y = targets[start:start + chunk_size]
            log_probs = torch.log_softmax(logits, dim=-1)  # one fused pass over the chunk
            total -= log_probs.gather(1, y[:, None]).sum()
            if grad is not None:
                probs = log_probs.exp_()  # softmax, in place: no second vocabulary-sized buffer
                probs[torch.arange(len(y)), y] -= 1.0
                grad[start:start + chunk_size] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * (grad_output / ctx.n).to(grad.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk_size: int = CHUNK) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of ``hidden`` (batch, seq, d) through the head ``weight`` (vocab, d)
    against ``labels`` (batch, seq) in the transformers convention (position t predicts labels[t+1];
    -100 is ignored). Returns (loss, number of predicted tokens)."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    selected = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    return _LinearCrossEntropy.apply(selected, weight.detach(), None if bias is None else bias.detach(),
                                     targets[keep], chunk_size), count


def reference_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain computation, for tests: full logits, shift, mean over labelled positions."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)

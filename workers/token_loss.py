"""The training loss: summed token cross-entropy over the loss positions, the output head run in chunks.

Only positions whose next token carries loss go through the output head, and never all at once: at a
128k vocabulary the (N × V) fp32 logits of 32k loss tokens are 17 GB, and autograd would keep as much
again (log-softmax) plus their gradient. The head runs on `rows_per_chunk` positions at a time, so at
most one chunk of logits is alive.

For a frozen nn.Linear head (the usual case: lm_head is neither quantized nor adapted) the gradient
with respect to the hidden states is taken in the forward pass, chunk by chunk, as Liger-Kernel's
fused linear cross-entropy does:
    z = h·Wᵀ + b        ℓ = logsumexp(z) − z_y        ∂ℓ/∂h = (softmax(z) − onehot(y))·W
so the head's matmul runs once and only ∂ℓ/∂h (N × H, the size of h) is kept for backward. Any other
head (adapted, trainable) runs each chunk under activation checkpointing: backward recomputes one
chunk's logits at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from workers.tokenization import IGNORE_INDEX

__all__ = ["TokenLoss", "default_rows_per_chunk"]

_CHUNK_LOGITS_BYTES = 64 * 2**20  # fp32 logits of one chunk: 128 rows at a 128k vocabulary


def default_rows_per_chunk(vocab_size: int) -> int:
    """Positions per chunk so that one chunk's fp32 logits take about 64 MiB."""
    return max(1, _CHUNK_LOGITS_BYTES // (4 * vocab_size))


def _chunk_sums(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and number of correct argmaxes of one chunk, through autograd."""
    logits = head(hidden).float()  # (C, V)
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    return loss_sum, (logits.argmax(dim=-1) == targets).sum()


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """(Σ ℓ, n_correct) over rows of `hidden` through a frozen linear head; ∂Σℓ/∂h computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows_per_chunk):
        grad_hidden = torch.empty_like(hidden)  # (N, H)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        n_correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for start in range(0, hidden.shape[0], rows_per_chunk):
            h, y = hidden[start : start + rows_per_chunk], targets[start : start + rows_per_chunk]
            z = F.linear(h, weight, bias)  # (C, V), in the autocast dtype under autocast
            logits = z.float()
            lse = torch.logsumexp(logits, dim=-1)  # (C,)
            loss_sum += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            n_correct += (logits.argmax(dim=-1) == y).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: no second (C, V) buffer
            probs[torch.arange(len(y), device=y.device), y] -= 1.0  # softmax − onehot = ∂ℓ/∂z
            with torch.autocast(hidden.device.type, enabled=False):
                grad = probs.to(z.dtype) @ weight.to(z.dtype)  # (C, H), the head's own matmul dtype
            grad_hidden[start : start + rows_per_chunk] = grad
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(n_correct)
        return loss_sum, n_correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None


class TokenLoss(nn.Module):
    """Sum of cross-entropies and of correct argmaxes over the loss tokens of a batch.

    Runs the decoder, then the output head on the positions whose next token carries loss, in chunks
    of `rows_per_chunk` positions (default: ~64 MiB of fp32 logits each). Wrapping the whole
    computation in one module lets DDP see a single forward per backward.
    """

    def __init__(self, causal_lm: nn.Module, rows_per_chunk: int | None = None):
        super().__init__()
        self.causal_lm = causal_lm
        head = causal_lm.get_output_embeddings()
        self.rows_per_chunk = rows_per_chunk or default_rows_per_chunk(head.weight.shape[0])

    def forward(
        self, inputs: dict[str, torch.Tensor], loss_positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`loss_positions`: flat indices into (B, T) of the positions whose next token carries loss
        (`Batch.loss_positions`).
        Given, they are gathered without the host waiting for the device; else they come from a boolean
        mask of the labels, whose nonzero is such a wait."""
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = self.causal_lm.get_decoder()(**model_inputs, use_cache=False).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
        if loss_positions is None:
            keep = targets != IGNORE_INDEX
            return self.head_loss(hidden[:, :-1][keep], targets[keep])  # (N, H), (N,)
        hidden_rows = hidden.flatten(0, 1).index_select(0, loss_positions)  # (N, H)
        return self.head_loss(hidden_rows, labels.flatten().index_select(0, loss_positions + 1))

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ cross-entropy in fp32, n_correct) of the output head over rows `hidden` (N, H)."""
        head = self.causal_lm.get_output_embeddings()
        frozen_linear = type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())
        if frozen_linear and torch.is_grad_enabled() and hidden.requires_grad:
            return _FrozenHeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, self.rows_per_chunk)
        # Starts from 0·Σh, not a constant: with no loss token (a padding-only micro-batch) backward still
        # reaches every adapter, as DDP needs on every rank.
        loss_sum = hidden.sum().float() * 0.0
        n_correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for h, y in zip(hidden.split(self.rows_per_chunk), targets.split(self.rows_per_chunk), strict=True):
            if torch.is_grad_enabled():  # recompute this chunk's logits in backward instead of keeping them
                chunk_loss, chunk_correct = checkpoint(_chunk_sums, head, h, y, use_reentrant=False)
            else:
                chunk_loss, chunk_correct = _chunk_sums(head, h, y)
            loss_sum = loss_sum + chunk_loss
            n_correct = n_correct + chunk_correct
        return loss_sum, n_correct

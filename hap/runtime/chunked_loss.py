"""Cross-entropy over a wide class dim, a chunk of rows at a time.

A language model's loss reads logits of [tokens, vocab]: with a large vocabulary they are the
largest tensors of the step. Computed whole, the loss keeps an fp32 copy of the logits, their
log-softmax and, in backward, two gradients of the same size beside them, about 14 bytes per
logit under autocast. ``chunked_cross_entropy`` keeps only the logits as the model made them
(2 bytes per logit in fp16/bf16) and their gradient: each chunk of rows is cast, reduced and
freed in forward, and computed again in backward, where its gradient is written straight into
its rows of the logits' gradient.

Every row's gradient is what the whole computation gives, bit for bit: a row's softmax reads
only that row, and the chunk's backward is torch's own (the same cast, ``cross_entropy`` and
autocast state as forward). Only the summed loss may differ in its last bits, as the sum runs
chunk by chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 16 bytes each of fp32 temporaries, 256 MiB
# Logits up to this many run whole, as torch's loss: it keeps their log-softmax (4 bytes a logit)
# and peaks at 12 to 14 bytes a logit in backward, where the chunked loss keeps the logits and
# their gradient (4 to 8 bytes) beside one chunk's temporaries. Below 4 chunks that is no gain.
CHUNKED_ABOVE = 4 * CHUNK_ELEMENTS


def chunk_rows(classes: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(classes, 1))


def _chunk_loss(rows: torch.Tensor, target: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    return F.cross_entropy(rows.to(dtype), target, reduction="sum", ignore_index=ignore_index)


def _as_rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, range]:
    """The logits as [rows, classes], the targets as [rows], and where each chunk of rows starts."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows, target.reshape(-1), range(0, rows.shape[0], chunk_rows(rows.shape[-1]))


def _summed(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """The loss, summed a chunk at a time in order (the same sum in training and evaluation)."""
    rows, flat, starts = _as_rows(logits, target)
    total = rows.new_zeros((), dtype=dtype) if not starts else None  # no rows here: its addend is 0
    for lo in starts:
        part = _chunk_loss(rows[lo:lo + starts.step], flat[lo:lo + starts.step], ignore_index, dtype)
        total = part if total is None else total + part
    return total


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, dtype: torch.dtype):
        total = _summed(logits, target, ignore_index, dtype)
        kind = logits.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.ignore_index, ctx.dtype = ignore_index, dtype
        ctx.save_for_backward(logits, target)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, target = ctx.saved_tensors
        rows, flat, starts = _as_rows(logits.detach(), target)
        out = torch.empty_like(rows)
        kind, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            for lo in starts:
                piece = rows[lo:lo + starts.step].detach().requires_grad_(True)
                part = _chunk_loss(piece, flat[lo:lo + starts.step], ctx.ignore_index, ctx.dtype)
                (out[lo:lo + starts.step],) = torch.autograd.grad(part, piece, grad)
        return out.view_as(logits), None, None, None


def chunked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``cross_entropy(logits.reshape(-1, C).to(dtype), target.reshape(-1), reduction="sum",
    ignore_index=ignore_index)``, keeping only ``logits`` and their gradient where they are more
    than ``CHUNKED_ABOVE`` (module docstring); fewer run exactly that, whole."""
    if logits.numel() <= CHUNKED_ABOVE:
        return _chunk_loss(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index, dtype)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedCrossEntropy.apply(logits, target, ignore_index, dtype)
    return _summed(logits, target, ignore_index, dtype)

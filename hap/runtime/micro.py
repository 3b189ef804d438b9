"""Micro-batches: each rank runs its share of a global batch in pieces, accumulating the
gradients of every piece, and the optimizer steps once per global batch.

Micro-batch ``j`` of a step takes piece ``j`` of every rank's share: rank ``r``'s piece is
``ROWS[r]`` samples, right after its earlier pieces. A replicated batch input holds the pieces
of every rank, in rank order, so the forward sees a smaller global batch of ``sum(ROWS)``
samples split as ``ROWS``: the emitted forward writes every size that follows the batch in
terms of ``ROWS`` (``hap.capture.classify_batch``). A mean loss divides by the global batch's
count in every piece, so the pieces' losses and gradients add up to the whole batch's:
exact, except for models whose forward couples samples (BatchNorm in training mode takes
statistics per micro-batch, as under gradient accumulation on one device).

A forward that runs collectives (``LOCKSTEP``) needs every rank in every micro-batch, so all
ranks run the largest count; a data-parallel forward lets each rank run its own count (a
small-memory device more, smaller pieces).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .shares import offset, split_lengths


def pieces(share: int, count: int) -> tuple[int, ...]:
    """``share`` samples in ``count`` pieces as even as integers allow (larger ones first)."""
    return split_lengths(share, 1, (1,) * count) if count > 1 else (share,)


def schedule(shares: Sequence[int], counts: Sequence[int], lockstep: bool) -> list[tuple[int, ...]]:
    """Per micro-batch, every rank's samples (ROWS). In lockstep every rank runs ``max(counts)``
    micro-batches (some may be empty); otherwise rank ``r`` runs ``counts[r]`` (never an empty
    one, except a rank with no share, which runs one empty micro-batch) and has 0 samples in
    the micro-batches after its last."""
    if lockstep:
        k = max(counts)
        per_rank = [pieces(s, k) for s in shares]
    else:
        per_rank = [pieces(s, max(1, min(c, s))) for s, c in zip(shares, counts)]
    k = max(len(p) for p in per_rank)
    return [tuple(p[j] if j < len(p) else 0 for p in per_rank) for j in range(k)]


def runs(rows_per_micro: list[tuple[int, ...]], rank: int, lockstep: bool) -> list[int]:
    """The micro-batches this rank runs a forward for (at least one)."""
    mine = [j for j, rows in enumerate(rows_per_micro) if lockstep or rows[rank] > 0]
    return mine or [0]


def take(batch: Sequence[torch.Tensor], inputs: Sequence[int | None], shares: Sequence[int],
         rows_per_micro: list[tuple[int, ...]], j: int, rank: int) -> list[torch.Tensor]:
    """Micro-batch ``j`` of this rank's batch: its piece of each sharded input, and of each
    replicated input (which holds the whole global batch) every rank's piece, in rank order."""
    before = [sum(rows[r] for rows in rows_per_micro[:j]) for r in range(len(shares))]
    rows = rows_per_micro[j]
    starts = [offset(shares, r) + before[r] for r in range(len(shares))]  # each rank's piece in the global batch
    out = []
    for x, d in zip(batch, inputs):
        if d == 0:
            out.append(x.narrow(0, before[rank], rows[rank]))
        else:
            out.append(torch.cat([x.narrow(0, s, n) for s, n in zip(starts, rows)]))
    return out

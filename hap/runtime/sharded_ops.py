"""Local pieces of sharded ops that emitted programs call by name (no communication
except where a docstring says so)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .collectives import sum_over_ranks


def vocab_embedding(weight_rows: torch.Tensor, idx: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """Embedding whose table rows [offset, offset+length) live on this rank: rows owned
    elsewhere give 0, so the sum over ranks (a partial, P) is the full lookup."""
    owned = (idx >= offset) & (idx < offset + length)
    if length == 0:
        return weight_rows.new_zeros(*idx.shape, weight_rows.shape[1]) + 0 * weight_rows.sum()
    local = torch.where(owned, idx - offset, torch.zeros_like(idx))
    out = torch.nn.functional.embedding(local, weight_rows)
    return out * owned.unsqueeze(-1).to(out.dtype)


_deferred: list[tuple[torch.Tensor, float]] | None = None  # see count_deferred


def class_loss_count(target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                     total: float | None = None) -> float:
    """The global denominator of a mean cross-entropy / NLL over a sharded batch: the number
    (or total class weight) of targets that are not ``ignore_index``, summed over ranks by one
    all-reduce of a tensor on the rank's device (no host sync in the middle of forward). Under
    ``count_deferred`` (micro-batches) it records this rank's count and returns ``total``, the
    number of targets in the global batch, without communicating."""
    keep = target != ignore_index
    if weight is None:
        local = keep.sum()
    else:
        local = weight[target.clamp(min=0)].masked_fill(~keep, 0).sum()
    if _deferred is not None and total is not None:
        _deferred.append((local.detach().double(), float(total)))
        return float(total)
    return sum_over_ranks(local.detach().to(torch.float32))


@contextmanager
def count_deferred() -> Iterator[list[tuple[torch.Tensor, float]]]:
    """Class-loss denominators become a stand-in (the global batch's number of targets), and the
    true local counts are collected in the yielded list: micro-batches of one step may differ in
    number per rank, so a count cannot be all-reduced inside forward; the program sums the
    counts over ranks once per step and rescales gradients and loss by stand-in / true count."""
    global _deferred
    _deferred = []
    try:
        yield _deferred
    finally:
        _deferred = None


def embedding_bag_rows(weight_rows: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, offset: int,
                       length: int, num_rows: int, mode: int, per_sample_weights: torch.Tensor | None = None,
                       include_last_offset: bool = False, padding_idx: int | None = None):
    """``embedding_bag`` (mode sum or mean) over a table whose rows [offset, offset+length) live
    on this rank. Returns what ``aten.embedding_bag`` returns: the bags' partial sums (rows owned
    elsewhere contribute 0, so the sum over ranks is the full result, a P) and the full op's
    integer outputs (offset2bag, bag_size, max_indices), which depend only on the indices."""
    # the integer outputs of the full op, from a one-column stand-in table (cheap, no gradient)
    with torch.no_grad():
        stand_in = torch.zeros(num_rows, 1, dtype=weight_rows.dtype, device=weight_rows.device)
        _, offset2bag, bag_size, max_indices = torch.ops.aten.embedding_bag.padding_idx(
            stand_in, indices, offsets, False, mode, False, None, include_last_offset, padding_idx)
    owned = (indices >= offset) & (indices < offset + length)
    if padding_idx is not None and padding_idx >= 0:
        owned = owned & (indices != padding_idx)
    weights = owned.to(weight_rows.dtype)
    if per_sample_weights is not None:
        weights = weights * per_sample_weights
    bags = offsets.numel() - (1 if include_last_offset else 0)
    if length == 0:
        out = weight_rows.new_zeros(bags, weight_rows.shape[1]) + 0 * weight_rows.sum()
    else:
        local = torch.where(owned, indices - offset, torch.zeros_like(indices))
        out = torch.nn.functional.embedding_bag(local, weight_rows, offsets, mode="sum", per_sample_weights=weights,
                                                include_last_offset=include_last_offset)
    if mode == 1:  # mean: divide by the bag's (global) number of non-padding indices
        out = out / bag_size.clamp(min=1).unsqueeze(1).to(out.dtype)
    return out, offset2bag, bag_size, max_indices

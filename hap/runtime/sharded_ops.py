"""Local pieces of sharded ops that emitted programs call by name (no communication
except where a docstring says so)."""
from __future__ import annotations

import torch

from .collectives import sum_scalar


def vocab_embedding(weight_rows: torch.Tensor, idx: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """Embedding whose table rows [offset, offset+length) live on this rank: rows owned
    elsewhere give 0, so the sum over ranks (a partial, P) is the full lookup."""
    owned = (idx >= offset) & (idx < offset + length)
    if length == 0:
        return weight_rows.new_zeros(*idx.shape, weight_rows.shape[1]) + 0 * weight_rows.sum()
    local = torch.where(owned, idx - offset, torch.zeros_like(idx))
    out = torch.nn.functional.embedding(local, weight_rows)
    return out * owned.unsqueeze(-1).to(out.dtype)


def class_loss_count(target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int) -> float:
    """The global denominator of a mean cross-entropy / NLL over a sharded batch: the number
    (or total class weight) of targets that are not ``ignore_index``, summed over ranks."""
    keep = target != ignore_index
    if weight is None:
        local = keep.sum()
    else:
        local = weight[target.clamp(min=0)].masked_fill(~keep, 0).sum()
    return sum_scalar(local.detach().double())

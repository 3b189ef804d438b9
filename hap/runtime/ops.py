"""Ops that need communication inside them: batch norm over a batch sharded on dim 0."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import dist as _d
from .collectives import _lengths, all_reduce


def sync_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                    momentum: float, eps: float, lengths: Sequence[int]) -> torch.Tensor:
    """`F.batch_norm` of the full batch, for an input sharded on dim 0 (rank r holds lengths[r] rows).

    Training: global per-channel mean, then global biased variance from the summed squared deviations
    (two passes, exact), both through differentiable all-reduces; running stats are updated in place
    as PyTorch does (running_var from the unbiased variance). Eval: running stats, no communication.
    The gradients of `weight` and `bias` are this rank's addends (P): GradSync sums them with the
    other replicated gradients.
    """
    ls = _lengths(lengths, "sync_batch_norm")
    if x.dim() < 2:
        raise ValueError(f"hap.runtime.sync_batch_norm: input must be (N, C, ...), got shape {tuple(x.shape)}")
    if x.shape[0] != ls[_d.rank()]:
        raise ValueError(f"hap.runtime.sync_batch_norm: rank {_d.rank()} holds {x.shape[0]} rows but "
                         f"lengths[{_d.rank()}] is {ls[_d.rank()]}")
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("hap.runtime.sync_batch_norm: eval mode needs running_mean and running_var")
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    if not _d.is_distributed():
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)

    c = x.shape[1]
    count = sum(ls) * math.prod(x.shape[2:])
    if count <= 1:
        raise ValueError(f"hap.runtime.sync_batch_norm: expected more than 1 value per channel when "
                         f"training, got input of global shape {(sum(ls), *x.shape[1:])}")
    dims = [0, *range(2, x.dim())]
    bshape = (1, c) + (1,) * (x.dim() - 2)
    xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = all_reduce(xs.sum(dims)) / count
    xc = xs - mean.view(bshape)
    var = all_reduce((xc * xc).sum(dims)) / count
    y = xc * torch.rsqrt(var + eps).view(bshape)
    if weight is not None:
        y = y * weight.view(bshape)
    if bias is not None:
        y = y + bias.view(bshape)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var.detach() * (count / (count - 1))
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return y.to(x.dtype)


def recompute(block):
    """Run ``block()`` (a function of no arguments returning a tuple of tensors) under activation
    checkpointing: its intermediate activations are not kept, and backward runs its forward
    again (with the same random state) to get them. Collectives inside run again too, on every
    rank in the same order, since every rank recomputes the same blocks."""
    return torch.utils.checkpoint.checkpoint(block, use_reentrant=False)

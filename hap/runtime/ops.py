"""Ops that need communication inside them: batch norm over a batch sharded on dim 0."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import dist as _d
from . import prefetch
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


def recompute(block, keep: bool = False):
    """Run ``block()`` (a function of no arguments returning a tuple of tensors) under activation
    checkpointing: its intermediate activations are not kept, and backward runs its forward
    again (with the same random state) to get them, all of it: the collectives inside then run
    again on every rank in one order.

    ``keep``: this rank has the memory for the block's activations, and only some ranks
    recompute it. It keeps them and skips the recomputation; the only collectives such a
    block's forward runs are its weights' gathers (``hap.runtime.prefetch``), and this rank
    starts them again at the point of backward where the others recompute: backward's first
    use of a tensor the block saved."""
    if not keep:
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            return torch.utils.checkpoint.checkpoint(block, use_reentrant=False)
    again = _GathersAgain()
    with prefetch.recorded() as again.specs, torch.autograd.graph.saved_tensors_hooks(again.pack, again.unpack):
        return block()


class _GathersAgain:
    """Saved-tensor hooks of a kept block: a tensor is kept as it is; the first one backward
    unpacks starts the block's recorded gathers again (``hap.runtime.prefetch.start_again``)."""

    def __init__(self) -> None:
        self.specs: list = []
        self.done = False

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        if not self.done:
            self.done = True
            prefetch.start_again(self.specs)
        return t

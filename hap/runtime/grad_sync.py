"""Gradient all-reduce of the replicated parameters, overlapped with backward.

The plan lists the replicated parameters in buckets, in the order backward completes them
(``plan.predicted["grad_buckets"]``). With ``overlap``, a hook on each parameter launches its
bucket's all-reduce asynchronously as soon as the bucket's last gradient is accumulated, while
backward goes on computing earlier layers (as DDP does); ``finish`` launches what is left with the
step's loss riding in the last bucket, waits, and leaves every gradient as a view of its reduced
buffer. Buckets launch strictly in order, so every rank issues the same collectives in the same
order. Without ``overlap`` (plans whose backward runs its own collectives, which would queue behind
a bucket) everything is reduced in ``finish``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dist as _d
from .collectives import _bucket_buffer, sum_scalar


class GradSync:
    def __init__(self, buckets: Sequence[Sequence[torch.Tensor]], overlap: bool = True) -> None:
        seen: set[int] = set()
        self.buckets: list[list[torch.Tensor]] = []
        for b in buckets:
            mine = [p for p in b if id(p) not in seen]
            seen.update(id(p) for p in mine)
            if mine:
                self.buckets.append(mine)
        self.overlap = overlap and _d.is_distributed()
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._reset()
        if self.overlap:
            for b in self.buckets:
                for p in b:
                    p.register_post_accumulate_grad_hook(self._ready)

    def _reset(self) -> None:
        self._left = [len(b) for b in self.buckets]
        self._next = 0  # the next bucket to launch
        self._works: list[tuple[int, torch.Tensor, object, bool]] = []

    def _ready(self, p: torch.Tensor) -> None:
        i = self._bucket_of[id(p)]
        self._left[i] -= 1
        # launch every complete bucket in order, but keep the last one for finish() and the loss
        while self._next < len(self.buckets) - 1 and self._left[self._next] == 0:
            self._launch(self._next, None)

    def _launch(self, i: int, loss: torch.Tensor | None) -> None:
        bucket = self.buckets[i]
        with torch.no_grad():
            for p in bucket:
                if p.grad is None:  # this rank did not use it: it adds nothing
                    p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            parts = [p.grad.reshape(-1) for p in bucket]
            if loss is not None:
                parts.append(loss.detach().reshape(-1).to(parts[0].dtype))
            flat = _bucket_buffer(bucket, 0 if loss is None else parts[-1].numel())
            if any(x.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for x in parts):
                parts = [x.clone() for x in parts]
            torch.cat(parts, out=flat)
        work = _d._all_reduce_async(flat)
        self._works.append((i, flat, work, loss is not None))
        self._next = i + 1

    def finish(self, loss: torch.Tensor) -> float:
        """After backward: reduce what is left, wait for every bucket; returns the global loss."""
        if not _d.is_distributed() or not self.buckets:
            for b in self.buckets:
                for p in b:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            self._reset()
            return sum_scalar(loss)
        while self._next < len(self.buckets):
            last = self._next == len(self.buckets) - 1
            self._launch(self._next, loss if last else None)
        total = None
        for i, flat, work, has_loss in self._works:
            _d._wait(work)
            off = 0
            for p in self.buckets[i]:  # the gradients become views of the reduced buffer
                k = p.numel()
                p.grad = flat[off: off + k].view_as(p)
                off += k
            if has_loss:
                total = float(flat[off:].sum().item())
        self._reset()
        return total if total is not None else sum_scalar(loss)

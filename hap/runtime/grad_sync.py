"""Gradient all-reduce of the replicated parameters, overlapped with backward.

The plan lists the replicated parameters in buckets, in the order backward completes them
(``plan.predicted.grad_buckets``). With ``overlap``, a hook on each parameter launches its
bucket's all-reduce asynchronously as soon as the bucket's last gradient is accumulated, while
backward goes on computing earlier layers (as DDP does); ``finish`` launches what is left with the
step's loss riding in the last bucket, waits, and leaves every gradient as a view of its reduced
buffer. Buckets launch strictly in order, so every rank issues the same collectives in the same
order. Without ``overlap`` (plans whose backward runs its own collectives, which would queue behind
a bucket, and devices that cannot compute while they communicate, such as CPU ranks sharing the
cores) everything is reduced in ``finish``.

With ``reduce_dtype`` (bf16), each bucket is all-reduced as a bf16 copy and the sum copied
back into the fp32 gradients: half the bytes on the wire, for gradients rounded to 8 mantissa
bits before the sum (docs/precision.md). The loss then rides in a separate fp32 all-reduce.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from . import dist as _d
from . import emulate
from .collectives import fill_missing_grads, pack_bucket, sum_scalar, unpack_bucket


class GradSync:
    def __init__(self, buckets: Sequence[Sequence[torch.Tensor]], overlap: bool = True,
                 reduce_dtype: torch.dtype | None = None) -> None:
        self.reduce_dtype = reduce_dtype
        seen: set[int] = set()
        self.buckets: list[list[torch.Tensor]] = []
        for b in buckets:
            mine = [p for p in b if id(p) not in seen]  # a tied parameter is reduced once
            seen.update(id(p) for p in mine)
            kinds: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in mine:  # one flat buffer holds one dtype on one device
                kinds.setdefault((p.device, p.dtype), []).append(p)
            self.buckets.extend(kinds.values())
        self.overlap = overlap and _d.is_distributed()
        self.hold = False  # set while backward runs a micro-batch that is not the step's last
        self.launched_before: float | None = None  # last step: when backward's hooks launched the first bucket
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._reset()
        if self.overlap:
            for b in self.buckets:
                for p in b:
                    p.register_post_accumulate_grad_hook(self._ready)

    def _reset(self) -> None:
        self.first_launch: float | None = None  # perf_counter() when this step's first bucket was launched
        self._left = [len(b) for b in self.buckets]
        self._next = 0  # the next bucket to launch
        self._works: list[tuple[int, torch.Tensor, object, bool]] = []

    def _ready(self, p: torch.Tensor) -> None:
        if self.hold:  # a micro-batch's backward before the last: its gradients are not complete
            return
        i = self._bucket_of[id(p)]
        self._left[i] -= 1
        # launch every complete bucket in order, but keep the last one for finish() and the loss
        while self._next < len(self.buckets) - 1 and self._left[self._next] == 0:
            self._launch(self._next, None)

    def _launch(self, i: int, loss: torch.Tensor | None) -> None:
        if self.first_launch is None:
            self.first_launch = time.perf_counter()
        if self.reduce_dtype is None or self.reduce_dtype == self.buckets[i][0].dtype:
            flat = pack_bucket(self.buckets[i], loss)
            self._works.append((i, flat, flat, _d._all_reduce_async(flat), loss is not None))
        else:
            flat = pack_bucket(self.buckets[i])
            wire = flat.to(self.reduce_dtype)
            self._works.append((i, flat, wire, _d._all_reduce_async(wire), False))
            if loss is not None:
                total = loss.detach().reshape(-1).to(flat.dtype)
                self._works.append((-1, total, total, _d._all_reduce_async(total), True))
        self._next = i + 1

    def finish(self, loss: torch.Tensor, riders: torch.Tensor | None = None) -> float:
        """After backward: reduce what is left, wait for every bucket; returns the global loss.
        ``riders`` (a 1-D tensor, e.g. each rank's measurement in its own slot) are summed over
        ranks in the same collective as the loss, into ``self.riders``."""
        self.launched_before = self.first_launch  # a bucket the hooks launched while backward ran
        payload = loss.detach().reshape(1).float()
        if riders is not None:
            payload = torch.cat([payload, riders.detach().reshape(-1).float().to(payload.device)])
        self.riders = None
        if not _d.is_distributed() or not self.buckets:
            for b in self.buckets:
                fill_missing_grads(b)
            self._reset()
            if _d.is_distributed() and riders is not None:
                _d._all_reduce(payload)
                self.riders = payload[1:]
                return float(payload[0])
            self.riders = payload[1:] if riders is not None else None
            return sum_scalar(loss)
        # packing and unpacking the buckets is the gradient sync's work, not the model's compute:
        # an emulated slow device does not dilate it: emulation slows forward and backward only
        with emulate.undilated():
            # the hooks never launch the last bucket, so the loss always rides in it
            while self._next < len(self.buckets):
                last = self._next == len(self.buckets) - 1
                self._launch(self._next, payload if last else None)
            summed = payload
            for i, flat, wire, work, has_loss in self._works:
                _d._wait(work)
                if i < 0:  # the loss and riders, reduced on their own
                    summed = wire.detach().clone()
                    continue
                if wire is not flat:
                    flat.copy_(wire)
                got = unpack_bucket(self.buckets[i], flat, has_loss)
                if got is not None:
                    summed = got
        self._reset()
        if riders is not None:
            self.riders = summed[1:]
        return float(summed[0])

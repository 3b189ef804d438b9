"""Weights all-gathered ahead of use, so the gather runs while the rank computes.

A block of the emitted forward that reads sharded weights whole (FSDP-style: ``S(d) -> R``)
makes one ``Prefetch`` of its weights' gathers in the order it reads them. A block whose only
collectives are these gathers starts them all when it starts (``ahead=None``): they run one
after the other on the process group while the rank computes, and each weight is there as soon
as the link allows, at the price of the block's gathered weights in memory at once. A block
with other collectives starts them one ahead (``ahead=1``): taking gather ``i`` starts gather
``i + 1`` and then waits for gather ``i``, so its other collectives queue behind at most two
gathers. A block recomputed in backward makes its
``Prefetch`` again, and its gathers overlap the recomputation the same way. A rank that keeps
such a block's activations instead (``hap.runtime.ops.recompute``) records the gathers its
forward starts (``recorded``) and starts them again where the others recompute
(``start_again``): collectives run on every rank in one order.

Taken, a gather is the same differentiable all-gather as ``hap.runtime.all_gather`` (its
backward the reduce-scatter of the gradient, cast back to the weight's dtype first where the
weight was gathered as autocast's low-precision copy), on the same values: only when it runs
changes. The training step runs backward inside ``hap.runtime.collectives.deferred_grads``:
each reduce-scatter then starts when backward reaches it and runs while backward computes on,
and its rows are added to the weight's gradient once backward is done. The cost model prices
the same schedule (``hap.solve.prefetch_exposure``, ``hap.solve.scatter_exposure``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from . import dist as _d
from .collectives import LOW_DTYPES, _gather_args, _gather_start, _local_step, remember, scatter_back


class _Prefetched(torch.autograd.Function):
    """The whole weight from a started gather of ``x``'s shard; backward: the reduce-scatter
    (``hap.runtime.collectives.scatter_back``)."""

    @staticmethod
    def forward(ctx, x, dim, ls, form, finish):
        remember(ctx, x, dim, ls, form)
        return finish()

    @staticmethod
    def backward(ctx, g):
        return scatter_back(ctx, g), None, None, None, None


Spec = tuple[torch.Tensor, int, tuple[int, ...], str, "str | None"]  # (shard, dim, lengths, form, cast)
_recorders: list[list[Spec]] = []  # one per open ``recorded``: the gathers started inside, in order


@contextmanager
def recorded() -> Iterator[list[Spec]]:
    """The gathers that every ``Prefetch`` starts inside the block, in the order they start."""
    out: list[Spec] = []
    _recorders.append(out)
    try:
        yield out
    finally:
        _recorders.pop()


def _begin(spec: Spec) -> Callable[[], torch.Tensor]:
    """Start the gather ``spec``; the returned function waits for it."""
    x, dim, ls, form, cast = spec
    low = x.detach() if cast is None else x.detach().to(LOW_DTYPES[cast])
    return _gather_start(low, dim, ls, form, async_op=True)


def start_again(specs: Sequence[Spec]) -> None:
    """Run the gathers ``specs`` once more, each started one ahead of waiting for the one before
    as ``Prefetch`` runs them, and drop what they gather."""
    if not _d.is_distributed():
        return
    waiting = None
    for spec in specs:
        started = _begin(spec)
        if waiting is not None:
            waiting()
        waiting = started
    if waiting is not None:
        waiting()


class Prefetch:
    """The all-gathers of one block's sharded weights, started ahead of their use.

    ``gathers`` lists, in the order the block reads them, ``(shard, dim, lengths, form, cast)``
    as ``hap.runtime.all_gather`` takes them; ``take(i)`` returns gather ``i``'s whole weight.
    ``ahead``: how many gathers run beyond the one taken (None: all start now)."""

    def __init__(self, gathers: Sequence[tuple[torch.Tensor, int, Sequence[int], str, str | None]],
                 ahead: int | None = 1) -> None:
        if ahead is not None and ahead < 1:
            raise ValueError(f"hap.runtime.Prefetch: ahead={ahead!r}; give a number of gathers >= 1, or None for all")
        self._specs = []
        for x, dim, lengths, form, cast in gathers:
            dim, ls = _gather_args(x, dim, lengths, form, cast, "Prefetch")
            self._specs.append((x, dim, ls, form, cast))
        self._ahead = len(self._specs) if ahead is None else ahead
        self._started: dict[int, Callable[[], torch.Tensor]] = {}
        self._taken: set[int] = set()
        for i in range(self._ahead):
            self._start(i)

    def _start(self, i: int) -> None:
        if i >= len(self._specs) or i in self._started or i in self._taken:
            return
        if _recorders:
            _recorders[-1].append(self._specs[i])
        self._started[i] = _begin(self._specs[i]) if _d.is_distributed() else _local_step

    def take(self, i: int) -> torch.Tensor:
        """Gather ``i``'s whole weight (differentiable), once the ``ahead`` after it have started."""
        x, dim, ls, form, cast = self._specs[i]
        for j in range(i, i + self._ahead + 1):  # a gather taken before its turn starts now
            self._start(j)
        finish = self._started.pop(i)
        self._taken.add(i)
        if not _d.is_distributed():
            finish()
            return x if cast is None else x.to(LOW_DTYPES[cast])
        return _Prefetched.apply(x, dim, ls, form, finish)

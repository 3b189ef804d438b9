"""Every change of placement a tensor can make, decided in one place: ``move(src, dst)``.

The one table (as DTensor's ``_redistribute.py`` is for even shards):

  src \\ dst   R                    S(e)                       P
  R           –                    slice (local, free)        partial (local, free)
  S(d)        all-gather           all-to-all (d == e: –)     all-gather, then partial
  P           all-reduce           reduce-scatter             –

In backward autograd runs each collective's dual over the same bytes: all-gather ↔
reduce-scatter, all-reduce ↔ all-reduce, all-to-all ↔ the reverse all-to-all; the local
moves need no communication either way. A ``Move`` says which collective runs, its dual,
the ``hap.runtime`` call that performs it (``call``: what ``train.py`` contains, and
what the plan-time timer runs) and the forms it comes in for uneven shards (padded to
the largest shard, or grouped per owner). The cost model prices a move, the emitter
writes it, the op timer times it and the simulator replays it, all from this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hap.placement import Placement

DUAL = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather", "all_reduce": "all_reduce",
        "all_to_all": "all_to_all", "slice": "none", "partial": "none", "none": "none"}
UNEVEN_FORMS = ("padded", "grouped")  # how a collective over uneven shards is run (a per-edge choice)
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all")  # the kinds that communicate
UNEVEN_KINDS = ("all_gather", "reduce_scatter", "all_to_all")  # the kinds that run in one of UNEVEN_FORMS

Shard = tuple[int, tuple[int, ...]]  # (dim, per-rank lengths) of a sharded placement on a concrete tensor


@dataclass(frozen=True)
class Move:
    src: Placement
    dst: Placement
    kind: str  # "none" | "slice" | "partial" | "all_gather" | "all_reduce" | "reduce_scatter" | "all_to_all"

    @property
    def backward(self) -> str:
        """The collective autograd runs for this move in backward."""
        return DUAL[self.kind]

    @property
    def is_collective(self) -> bool:
        return self.kind in COLLECTIVES

    @property
    def forms(self) -> tuple[str, ...]:
        """The forms to choose from: uneven shards are padded or grouped; the rest have one."""
        return UNEVEN_FORMS if self.kind in UNEVEN_KINDS else ("",)

    def call(self, src: Shard | None, dst: Shard | None, form: str,
             cast: str | None = None) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
        """The ``hap.runtime`` function that performs the move and its arguments after the tensor:
        ``src`` / ``dst`` are the (dim, lengths) of the sharded sides; ``cast``, an all-gather's
        low dtype (``hap.cost.low_precision_gathers``)."""
        uneven = {"form": form} if form else {}
        if self.kind == "slice":
            return "slice_local", dst, {}
        if self.kind == "partial":
            return "to_partial", (), {}
        if self.kind == "all_reduce":
            return "all_reduce", (), {}
        if self.kind == "reduce_scatter":
            return "reduce_scatter", dst, uneven
        if self.kind == "all_gather":
            return "all_gather", src, {**uneven, **({"cast": cast} if cast else {})}
        if self.kind == "all_to_all":
            return "all_to_all", (*src, *dst), uneven
        raise ValueError(f"no call moves a tensor from {self.src} to {self.dst}")

    @property
    def then_partial(self) -> bool:
        """S → P gathers the whole tensor, then every rank but one holds it as a zero addend."""
        return self.kind == "all_gather" and self.dst.kind == "P"

    def code(self, tensor: str, src: Shard | None, dst: Shard | None, form: str, cast: str | None = None) -> str:
        """The move as a line of ``train.py``."""
        fn, args, kwargs = self.call(src, dst, form, cast)
        parts = [tensor, *(repr(a) for a in args), *(f"{k}={v!r}" for k, v in kwargs.items())]
        text = f"hr.{fn}({', '.join(parts)})"
        return f"hr.to_partial({text})" if self.then_partial else text

    def apply(self, x: Any, src: Shard | None, dst: Shard | None, form: str) -> Any:
        """Perform the move on a local tensor with ``hap.runtime`` (the plan-time timer runs this)."""
        import hap.runtime as hr

        fn, args, kwargs = self.call(src, dst, form)
        out = getattr(hr, fn)(x, *args, **kwargs)
        return hr.to_partial(out) if self.then_partial else out


def move(src: Placement, dst: Placement) -> Move:
    """The move that turns a tensor in placement ``src`` into placement ``dst``."""
    if src == dst:
        return Move(src, dst, "none")
    if src.kind == "R":
        return Move(src, dst, "slice" if dst.kind == "S" else "partial")
    if src.kind == "P":
        return Move(src, dst, "all_reduce" if dst.kind == "R" else "reduce_scatter")
    return Move(src, dst, "all_gather" if dst.kind in ("R", "P") else "all_to_all")

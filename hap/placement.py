"""Placements of a tensor across ranks, and the integer split of a dimension.

- ``R``: replicated, every rank holds the whole tensor;
- ``S(d)`` / ``S(d/u)``: sharded on dim ``d``; the dim is cut into blocks of ``u``
  elements (``unit``, default 1) and the blocks are split over ranks by the plan's
  ratio, so rank ``r`` holds ``u * split(size // u)[r]`` contiguous elements
  (uneven, possibly 0);
- ``P``: partial, every rank holds a full-shaped addend and the true value is the sum.

A unit keeps views exact: ``[B, T, 768] S(2/64)`` views as ``[B, T, 12, 64] S(2)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Placement:
    kind: str  # "R", "S" or "P"
    dim: int = -1
    unit: int = 1

    def __str__(self) -> str:
        if self.kind != "S":
            return self.kind
        return f"S({self.dim})" if self.unit == 1 else f"S({self.dim}/{self.unit})"

    @property
    def is_shard(self) -> bool:
        return self.kind == "S"

    def to_json(self) -> str:
        return str(self)

    @classmethod
    def from_json(cls, s: str) -> Placement:
        return parse(s)


R = Placement("R")
P = Placement("P")


def S(dim: int, unit: int = 1) -> Placement:
    return Placement("S", dim, unit)


def parse(s: str) -> Placement:
    s = s.strip()
    if s in ("R", "P"):
        return Placement(s)
    if s.startswith("S(") and s.endswith(")"):
        body = s[2:-1]
        if "/" in body:
            d, u = body.split("/")
            return S(int(d), int(u))
        return S(int(body))
    raise ValueError(f"not a placement: {s!r} (expected R, P, S(d) or S(d/u))")


def largest_remainder(total: int, ratios: Sequence[float]) -> tuple[int, ...]:
    """Integer parts of ``total`` proportional to ``ratios`` that sum to ``total``.

    Floors first, then the remainder goes to the largest fractional parts (ties to the
    lower rank), as HAP does; a zero ratio gets zero.
    """
    s = float(sum(ratios))
    assert s > 0 and total >= 0
    exact = [total * r / s for r in ratios]
    parts = [int(x) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return tuple(parts)


@dataclass(frozen=True)
class Splitter:
    """Per-rank lengths of any sharded dimension, derived from the batch shares.

    ``shares`` are integer samples of the global batch per rank; every other dim of
    size ``n`` (in blocks of ``unit``) is split in the same ratio by largest remainder,
    so a batch dim of the global batch size gets exactly ``shares``.
    """

    shares: tuple[int, ...]

    @property
    def num_ranks(self) -> int:
        return len(self.shares)

    @property
    def total(self) -> int:
        return sum(self.shares)

    def lengths(self, size: int, unit: int = 1) -> tuple[int, ...]:
        assert size % unit == 0, (size, unit)
        blocks = size // unit
        if blocks == self.total:
            return tuple(unit * s for s in self.shares)
        if self.total == 0:
            return (size,) + (0,) * (self.num_ranks - 1)
        return tuple(unit * b for b in largest_remainder(blocks, self.shares))

    def fractions(self, size: int, unit: int = 1) -> tuple[float, ...]:
        return tuple(x / size for x in self.lengths(size, unit)) if size else (0.0,) * self.num_ranks

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

import functools
from dataclasses import dataclass

from hap.runtime.shares import split_lengths  # the one rule, shared with train.py


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
        return _lengths(size, unit, self.shares)

    def fractions(self, size: int, unit: int = 1) -> tuple[float, ...]:
        return _fractions(size, unit, self.shares)


# the cost model asks for the same few dims of every node on every share vector: memoised
@functools.lru_cache(maxsize=1 << 16)
def _lengths(size: int, unit: int, shares: tuple[int, ...]) -> tuple[int, ...]:
    assert size % unit == 0, (size, unit)
    return split_lengths(size, unit, shares)


@functools.lru_cache(maxsize=1 << 16)
def _fractions(size: int, unit: int, shares: tuple[int, ...]) -> tuple[float, ...]:
    return tuple(x / size for x in _lengths(size, unit, shares)) if size else (0.0,) * len(shares)

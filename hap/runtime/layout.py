"""The contract between an emitted ``train.py`` and the runtime: one frozen ``Layout``.

``train.py`` builds it once (``Layout.build(FORMAT, ...)``) from what its plan decided, and
passes it with its forward to ``hap.runtime.program.main``. The runtime places it on a rank
(``placed``), follows a re-balancing with ``with_shares`` and a micro-batch with ``with_rows``:
each returns a new value, and nothing writes into the program's module. The forward reads only
its ``layout`` argument (``rank``, ``rows``, ``lengths``, ``device``, ``random_on_cpu``,
``recompute_counts``).

A rank's part of the model is named here, per placeholder: ``params`` holds each parameter's
sharded dim and per-rank lengths, so a rank that owns only some parameters (a big model built
by parts, a pipeline stage) is a layout whose tables hold that rank's part; the loop and the
checkpoints read the tables, never the graph.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .shares import offset, split_lengths

FORMAT = 1  # the layout format this runtime reads; another one is re-emitted, not guessed at


def rank_slice(full: torch.Tensor, dim: int | None, lengths: Sequence[int] | None, rank: int) -> torch.Tensor:
    """``rank``'s slice of ``full`` along ``dim`` (the whole tensor when replicated)."""
    return full if dim is None else full.narrow(dim, offset(lengths, rank), lengths[rank])


@dataclass(frozen=True)
class Param:
    """A parameter placeholder: its ``state_dict`` keys (tied weights share one placeholder),
    the dim it is sharded on (None: replicated) with the per-rank lengths, and ``split``: the
    (size, unit) of that dim when its lengths follow the shares (re-cut on a re-balancing)."""
    keys: tuple[str, ...]
    dim: int | None = None
    lengths: tuple[int, ...] | None = None
    split: tuple[int, int] | None = None

    @property
    def sharded(self) -> bool:
        return self.dim is not None

    def local(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        return rank_slice(full, self.dim, self.lengths, rank)


def _frozen(d: Mapping) -> Mapping:
    """A read-only mapping; one already frozen is kept (a layout per micro-batch copies nothing)."""
    return d if isinstance(d, MappingProxyType) else MappingProxyType(dict(d))


@dataclass(frozen=True)
class Layout:
    """What one program's plan decided, and where this rank stands in it.

    spec             the model spec, relative to train.py
    plan_digest      the plan's digest (every rank must run the same)
    global_batch     samples per step, over all ranks
    shares           per rank: its samples of each global batch
    slowdown         per rank: compute dilation under --emulate (CPU emulation)
    devices          per rank: the device type it was planned on
    places           per rank: (node, local rank, processes on that node), as torchrun starts them
    params           placeholder -> Param
    buffers          placeholder -> state_dict key
    inputs           per batch tensor: 0 (sharded on dim 0 by the shares) or None (replicated)
    input_samples    per batch tensor: (shape of one sample, dtype)
    lengths          (size, unit) -> per-rank lengths of a sharded dim that does not follow the batch
    micro_batches    per rank: micro-batches its share runs in (the default of --micro-batches)
    lockstep         forward runs collectives, so every rank runs as many micro-batches
    fixed_batch      why the forward only runs whole global batches (empty: it runs any)
    random_on_cpu    replicated random ops draw on the CPU (GPU models differ), alike on every rank
    shapes           state_dict key -> shape the plan was made for
    grad_buckets     replicated params whose gradients are all-reduced, bucket by bucket, in order
    grad_overlap     each bucket is all-reduced during backward, as soon as it is complete
    precision        "fp32", or the autocast dtype "bf16" / "fp16" forward runs under
    optimizer        the default of --optimizer: the optimizer whose state the plan's memory counts
    grad_reduce      the dtype grad_buckets are all-reduced in: "fp32" or "bf16"
    rebalance        shares may change while the program runs (measured speeds)
    recompute_counts per rank: how many of the recomputed blocks (the first ones) it runs again in
                     backward; it keeps the others' activations (``hap.runtime.ops.recompute``); (): all
    rank, device     this rank and its device (``placed``)
    rows             per rank: the samples forward runs (a micro-batch's; the shares otherwise)
    """
    spec: str
    plan_digest: str
    global_batch: int
    shares: tuple[int, ...]
    slowdown: tuple[float, ...]
    devices: tuple[str, ...]
    places: tuple[tuple[int, int, int], ...]
    params: Mapping[str, Param]
    buffers: Mapping[str, str]
    inputs: tuple[int | None, ...]
    input_samples: tuple[tuple[tuple[int, ...], str], ...]
    lengths: Mapping[tuple[int, int], tuple[int, ...]]
    micro_batches: tuple[int, ...]
    lockstep: bool
    fixed_batch: tuple[str, ...]
    random_on_cpu: bool
    shapes: Mapping[str, tuple[int, ...]]
    grad_buckets: tuple[tuple[str, ...], ...]
    grad_overlap: bool
    precision: str
    optimizer: str
    grad_reduce: str
    rebalance: bool
    recompute_counts: tuple[int, ...] = ()
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rows: tuple[int, ...] = ()
    format: int = FORMAT

    def __post_init__(self) -> None:
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("params", "buffers", "lengths", "shapes"):
            fix(name, _frozen(getattr(self, name)))
        fix("grad_buckets", tuple(tuple(b) for b in self.grad_buckets))
        if not self.rows:
            fix("rows", tuple(self.shares))

    @classmethod
    def build(cls, format: int, **fields: Any) -> Layout:
        """The layout train.py states; a program of another format is refused with the command
        that re-emits it (its fields may mean something else to this runtime)."""
        known = {f.name for f in dataclasses.fields(cls)}
        if format != FORMAT or not set(fields) <= known:
            spec = fields.get("spec", "SPEC")
            print(f"train.py: this program's layout is format {format}, and the installed hap reads format "
                  f"{FORMAT}; re-emit it with this hap: hap-plan {spec} --emit DIR --force", file=sys.stderr,
                  flush=True)
            raise SystemExit(2)
        return cls(format=format, **fields)

    @property
    def world_size(self) -> int:
        return len(self.shares)

    @property
    def sharded(self) -> list[str]:
        """The placeholders of sharded parameters."""
        return [name for name, p in self.params.items() if p.sharded]

    def placed(self, rank: int, device: torch.device) -> Layout:
        return dataclasses.replace(self, rank=rank, device=device)

    def with_rows(self, rows: Sequence[int]) -> Layout:
        """The layout of one micro-batch: every rank runs ``rows`` samples."""
        return dataclasses.replace(self, rows=tuple(rows))

    def with_shares(self, shares: Sequence[int]) -> Layout:
        """Every rank takes ``shares`` of the global batch: the rows and the lengths of every
        sharded dim that follows the shares (``lengths``, the ``split`` params) follow."""
        shares = tuple(shares)
        params = {name: dataclasses.replace(p, lengths=split_lengths(*p.split, shares)) if p.split else p
                  for name, p in self.params.items()}
        return dataclasses.replace(self, shares=shares, rows=shares, params=params,
                                   lengths={key: split_lengths(*key, shares) for key in self.lengths})

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["params"] = {name: dataclasses.asdict(p) for name, p in self.params.items()}
        out["lengths"] = [[size, unit, list(ls)] for (size, unit), ls in self.lengths.items()]
        out["device"] = str(self.device)
        for name in ("buffers", "shapes"):
            out[name] = dict(out[name])
        return json.loads(json.dumps(out))  # tuples as lists: what JSON holds

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        d = dict(data)
        fmt = d.pop("format", None)
        d["params"] = {name: Param(tuple(p["keys"]), p["dim"], _tuple(p["lengths"]), _tuple(p["split"]))
                       for name, p in d["params"].items()}
        d["lengths"] = {(size, unit): tuple(ls) for size, unit, ls in d["lengths"]}
        d["device"] = torch.device(d["device"])
        d["places"] = tuple(tuple(p) for p in d["places"])
        d["input_samples"] = tuple((tuple(shape), dtype) for shape, dtype in d["input_samples"])
        d["shapes"] = {k: tuple(v) for k, v in d["shapes"].items()}
        for name in ("shares", "slowdown", "devices", "inputs", "micro_batches", "fixed_batch", "rows"):
            d[name] = tuple(d[name])
        d["recompute_counts"] = tuple(d.get("recompute_counts", ()))
        return cls.build(fmt, **d)


def _tuple(x):
    return None if x is None else tuple(x)

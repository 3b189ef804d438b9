"""Sharding rules: for each ATen op, the legal placements of its inputs and output.

A rule is a small pure function ``rule(node, ctx) -> list[Candidate]`` registered with
``@rule("aten.linear.default", ...)``; one file per op family. Every node also gets the
all-replicated candidate, so an op without a rule still runs (replicated, with a
warning naming it and its source line); ``strict=True`` makes that an error.

A ``Candidate`` names the placement of every tensor input (aligned with
``node.inputs()``, repeats included), the output placement (for list outputs such as
``split``: of every element), the ``split`` (size, unit) that divides the node's work
between ranks (``None``: every rank does all of it), how to emit it (``emit``), and
argument rewrites (shape arguments specialised to the local lengths, via ``Local``).
"""
from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hap.errors import UnsupportedOp
from hap.graph import Graph, Node, TensorMeta
from hap.placement import P, Placement, R, S, Splitter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Local:
    """A per-rank integer in emitted code: the local length of a dim of ``size`` split in
    blocks of ``unit``; ``scale`` multiplies it (merged dims)."""

    size: int
    unit: int = 1
    what: str = "len"  # the local length (the one kind of per-rank integer a rule rewrites in)
    scale: int = 1
    batch: tuple[int, ...] = ()  # (f, c) when size is f*B + c of the global batch B (Node.batch_dims)

    @classmethod
    def of(cls, node: Node, dim: int, unit: int = 1) -> Local:
        """The local length of dim ``dim`` of ``node``'s output."""
        fc = tuple(node.batch_dims[dim]) if node.batch_dims else ()
        return cls(node.out.shape[dim], unit, batch=fc if fc and fc[0] else ())


FORWARD_COLLECTIVE_EMITS = ("sync_batch_norm", "experts")  # renderings that run a collective in forward


@dataclass(frozen=True)
class Candidate:
    """One way to compute a node: its inputs' and output's placements, the batch split it
    follows, and how the emitter writes it (``emit``: an ATen call, or a rendering its rule's
    family registered; those in ``FORWARD_COLLECTIVE_EMITS`` communicate in forward)."""

    name: str
    inputs: tuple[Placement, ...]
    output: Placement
    split: tuple[int, int] | None = None
    emit: str = "call"
    rewrite: tuple[tuple[int, Any], ...] = ()  # (positional arg index, new value)
    extra: tuple = ()

    def __str__(self) -> str:
        ins = ", ".join(str(p) for p in self.inputs)
        return f"{self.name}: ({ins}) -> {self.output}"

    def to_json(self) -> dict[str, Any]:
        """Everything emitting the candidate needs, so a plan carries its choice, not a name
        that the rules of another version of hap might no longer offer."""
        return {"candidate": self.name, "inputs": [str(p) for p in self.inputs], "output": str(self.output),
                "split": list(self.split) if self.split else None, "emit": self.emit,
                "rewrite": [[i, _encode_local(v)] for i, v in self.rewrite], "extra": _encode_local(list(self.extra))}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Candidate:
        from hap.placement import parse

        return cls(d["candidate"], tuple(parse(p) for p in d["inputs"]), parse(d["output"]),
                   tuple(d["split"]) if d.get("split") else None, d.get("emit", "call"),
                   tuple((int(i), _decode_local(v)) for i, v in d.get("rewrite", [])),
                   tuple(_decode_local(d.get("extra", []))))


def _encode_local(v: Any) -> Any:
    if isinstance(v, Local):
        return {"local": [v.size, v.unit, v.what, v.scale, list(v.batch)]}
    if isinstance(v, (list, tuple)):
        return [_encode_local(x) for x in v]
    if isinstance(v, dict):
        return {k: _encode_local(x) for k, x in v.items()}
    return v


def _decode_local(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"local"}:
        size, unit, what, scale, *batch = v["local"]
        return Local(size, unit, what, scale, tuple(batch[0]) if batch else ())
    if isinstance(v, list):
        return [_decode_local(x) for x in v]
    if isinstance(v, dict):
        return {k: _decode_local(x) for k, x in v.items()}
    return v


RuleFn = Callable[[Node, "RuleContext"], list[Candidate]]
RULES: dict[str, RuleFn] = {}
# how a candidate whose ``emit`` is not "call" is written into train.py, registered by the
# op family that makes such candidates, next to its rule: fn(emitter, node, candidate, refs),
# where refs are the local variables of the node's inputs and the emitter offers call(),
# render(), lengths() and graph
Renderer = Callable[[Any, Node, Candidate, list[str]], str]
RENDERERS: dict[str, Renderer] = {}


def renders(kind: str) -> Callable[[Renderer], Renderer]:
    def register(fn: Renderer) -> Renderer:
        RENDERERS[kind] = fn
        return fn

    return register
FAMILIES = ("matmul", "pointwise", "reduction", "norm", "shape", "embedding", "conv", "attention", "loss",
            "indexing")


def rule(*targets: str) -> Callable[[RuleFn], RuleFn]:
    def register(fn: RuleFn) -> RuleFn:
        for t in targets:
            RULES[t] = fn
        return fn

    return register


_loaded = False


def load_rules() -> None:
    global _loaded
    if not _loaded:
        for fam in FAMILIES:
            importlib.import_module(f"hap.rules.{fam}")
        _loaded = True


@dataclass
class RuleContext:
    graph: Graph
    splitter: Splitter
    units: dict[int, set[int]] = field(default_factory=dict)

    @property
    def num_ranks(self) -> int:
        return self.splitter.num_ranks

    def meta(self, name: str) -> TensorMeta:
        m = self.graph[name].meta
        if isinstance(m, list):
            return m[0]
        assert isinstance(m, TensorMeta), name
        return m

    def shard_units(self, size: int, may_be_batch: bool = True) -> list[int]:
        """Units a dim of ``size`` may be sharded in: 1, and inner sizes seen in views. A
        zero-length shard is fine on the batch (a rank with a zero share runs no samples), not on
        weights and features (a conv with 0 output channels does not run); ``may_be_batch``
        False: the dim is never the batch, even when its size equals the global batch."""
        if size < 2 or self.num_ranks < 2:
            return []
        out = []
        for u in sorted({1} | self.units.get(size, set())):
            if size % u or size // u < 2:
                continue
            batch = may_be_batch and size // u == self.splitter.total
            if not batch and 0 in self.splitter.lengths(size, u):
                continue
            out.append(u)
        return out


def view_units(graph: Graph) -> dict[int, set[int]]:
    """For each dim size that a view splits or merges, the block sizes that keep the view exact."""
    units: dict[int, set[int]] = {}
    for n in graph.ops():
        if n.target not in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
                            "aten.flatten.using_ints", "aten.unflatten.int"):
            continue
        src = graph[n.inputs()[0]].meta
        if not isinstance(src, TensorMeta) or not isinstance(n.meta, TensorMeta):
            continue
        for ins, outs in view_groups(src.shape, n.meta.shape):
            if len(ins) == 1 and len(outs) > 1:
                units.setdefault(src.shape[ins[0]], set()).add(math.prod(n.meta.shape[o] for o in outs[1:]))
            if len(outs) == 1 and len(ins) > 1:
                units.setdefault(n.meta.shape[outs[0]], set()).add(math.prod(src.shape[i] for i in ins[1:]))
    return units


def view_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of source dims with runs of destination dims of equal product."""
    groups = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = 1
        if i < len(src):
            gi.append(i)
            pi = src[i]
            i += 1
        if j < len(dst):
            gj.append(j)
            pj = dst[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(src):
                gi.append(i)
                pi *= src[i]
                i += 1
            elif j < len(dst):
                gj.append(j)
                pj *= dst[j]
                j += 1
            elif i < len(src):
                gi.append(i)
                pi *= src[i]
                i += 1
            else:
                break
        # absorb trailing size-1 dims into this group
        while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            gi.append(i)
            i += 1
        while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            gj.append(j)
            j += 1
        groups.append((gi, gj))
    return groups


def replicated(node: Node) -> Candidate:
    return Candidate("R", tuple(R for _ in node.inputs()), R)


def candidates(node: Node, ctx: RuleContext, strict: bool = False) -> list[Candidate]:
    """All candidates of ``node`` (the replicated one first), deduplicated by name."""
    load_rules()
    out = [replicated(node)]
    if node.kind != "op":
        return out
    fn = RULES.get(node.target)
    if fn is None:
        if strict:
            raise UnsupportedOp(f"{node.target} has no sharding rule ({node.source or node.name}); "
                                "run without strict=True to run it replicated, or add a rule in hap/rules/")
        return out
    seen = {"R"}
    for c in fn(node, ctx):
        if c.name in seen:
            continue
        assert len(c.inputs) == len(node.inputs()), (node.name, c)
        seen.add(c.name)
        out.append(c)
    return out


def has_rule(target: str) -> bool:
    load_rules()
    return target in RULES


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def is_ref(a: Any) -> bool:
    return isinstance(a, dict) and "node" in a and len(a) == 1


def local_shape(shape: tuple[int, ...], dim: int, unit: int, scale: int = 1, size: int | None = None) -> list:
    """``shape`` with dim ``dim`` replaced by the rank's local length."""
    out: list = list(shape)
    out[dim] = Local(size if size is not None else shape[dim] // scale, unit, "len", scale)
    return out


__all__ = [
    "RENDERERS",
    "Candidate",
    "Local",
    "P",
    "Placement",
    "R",
    "RuleContext",
    "S",
    "arg",
    "candidates",
    "has_rule",
    "is_ref",
    "local_shape",
    "norm_dim",
    "renders",
    "rule",
    "view_groups",
    "view_units",
]

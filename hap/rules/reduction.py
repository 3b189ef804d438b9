"""Reductions and softmax: shard a kept dim freely; a sum/mean over a sharded dim is P.

A mean over a sharded dim is emitted as ``local sum / global count`` (never a mean of
local means), so uneven shards stay exact.
"""
from __future__ import annotations

import math

from hap.graph import Node
from hap.rules import Candidate, P, RuleContext, S, arg, norm_dim, renders, rule


def _reduced_dims(node: Node, ndim: int, dim_index: int = 1) -> list[int]:
    dims = arg(node, dim_index, "dim", None)
    if dims is None or dims == []:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(norm_dim(d, ndim) for d in dims)


def keep_dim_candidates(node: Node, ctx: RuleContext, reduced: list[int], keepdim: bool) -> list[Candidate]:
    x = ctx.meta(node.inputs()[0])
    cands = []
    nin = len(node.inputs())
    for d in range(x.ndim):
        if d in reduced:
            continue
        od = d if keepdim else d - sum(1 for r in reduced if r < d)
        for u in ctx.shard_units(x.shape[d]):
            cands.append(Candidate(f"S({d})" if u == 1 else f"S({d}/{u})", (S(d, u),) * nin, S(od, u),
                                   split=(x.shape[d], u)))
    return cands


@rule("aten.sum.dim_IntList", "aten.sum.default", "aten.mean.dim", "aten.mean.default")
def sum_mean(node: Node, ctx: RuleContext) -> list[Candidate]:
    x = ctx.meta(node.inputs()[0])
    reduced = _reduced_dims(node, x.ndim)
    keepdim = bool(arg(node, 2, "keepdim", False)) if node.target.endswith("dim_IntList") or \
        node.target.endswith("mean.dim") else False
    cands = keep_dim_candidates(node, ctx, reduced, keepdim)
    is_mean = ".mean." in node.target
    for d in reduced:
        for u in ctx.shard_units(x.shape[d]):
            cands.append(Candidate(f"S({d})->P" if u == 1 else f"S({d}/{u})->P", (S(d, u),), P,
                                   split=(x.shape[d], u), emit="mean_partial" if is_mean else "call"))
    cands.append(Candidate("P", (P,), P))
    return cands


@rule("aten.amax.default", "aten.amin.default", "aten.max.dim", "aten.min.dim", "aten.argmax.default",
      "aten.argmin.default", "aten.var.correction", "aten.std.correction", "aten.var.dim", "aten.std.dim",
      "aten.logsumexp.default", "aten.prod.dim_int", "aten.any.dim", "aten.all.dim", "aten.norm.ScalarOpt_dim",
      "aten.linalg_vector_norm.default")
def other_reduction(node: Node, ctx: RuleContext) -> list[Candidate]:
    x = ctx.meta(node.inputs()[0])
    if node.target in ("aten.max.dim", "aten.min.dim", "aten.prod.dim_int", "aten.any.dim", "aten.all.dim"):
        d = arg(node, 1, "dim")
        reduced = [norm_dim(d, x.ndim)] if x.ndim else []
    elif node.target.startswith("aten.linalg_vector_norm") or node.target.startswith("aten.norm"):
        reduced = _reduced_dims(node, x.ndim, 2)
    else:
        reduced = _reduced_dims(node, x.ndim)
    keepdim = bool(arg(node, 3 if "norm" in node.target else 2, "keepdim", False))
    return keep_dim_candidates(node, ctx, reduced, keepdim)


@rule("aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default",
      "aten.cumsum.default", "aten.cumprod.default", "aten.sort.default", "aten.topk.default",
      "aten.argsort.default")
def along_dim(node: Node, ctx: RuleContext) -> list[Candidate]:
    """Ops along one dim: every other dim may be sharded; the op's own dim may not."""
    x = ctx.meta(node.inputs()[0])
    dim_index = 2 if node.target == "aten.topk.default" else 1
    d = arg(node, dim_index, "dim", -1)
    return keep_dim_candidates(node, ctx, [norm_dim(d, x.ndim)] if x.ndim else [], keepdim=True)


@renders("mean_partial")
def mean_partial(em, node: Node, cand: Candidate, refs: list[str]) -> str:
    """A mean over a sharded dim: the local sum divided by the global count (never a mean of means)."""
    x = em.graph[node.inputs()[0]].out
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if node.target == "aten.mean.default" or not dims:
        return f"aten.sum.default({refs[0]}) / {x.numel}"
    dims = [dims] if isinstance(dims, int) else dims
    count = math.prod(x.shape[d] for d in dims)
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return f"aten.sum.dim_IntList({refs[0]}, {list(dims)}, {keep!r}) / {count}"


@rule("aten.histc.default")
def histc(node: Node, ctx: RuleContext) -> list[Candidate]:
    """A histogram counts every element of its input: the counts of a sharded input are the
    sum of each shard's counts (P), where the range is given (min == max takes the range from
    the data, which differs between shards)."""
    x = ctx.meta(node.inputs()[0])
    if arg(node, 2, "min", 0) == arg(node, 3, "max", 0):
        return []
    return [Candidate(f"S({d})->P" if u == 1 else f"S({d}/{u})->P", (S(d, u),), P, split=(x.shape[d], u))
            for d in range(x.ndim) for u in ctx.shard_units(x.shape[d])]

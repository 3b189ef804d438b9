"""Views and shape ops. A view keeps a shard exact when the sharded dim is the outermost
(non-1) dim of its group of merged/split dims; the shard's unit is rescaled so the per-rank
lengths agree on both sides. Shape arguments are rewritten to the rank's local lengths."""
from __future__ import annotations

import math

from hap.graph import Node, TensorMeta
from hap.placement import Placement
from hap.rules import Candidate, Local, P, R, RuleContext, S, arg, norm_dim, rule, view_groups


def _tag(p) -> str:
    return str(p)


def view_map(src: tuple[int, ...], dst: tuple[int, ...], d: int, u: int) -> tuple[int, int] | None:
    """Where ``S(d/u)`` of a ``src``-shaped tensor lands after a view to ``dst``: (dim, unit) or None."""
    for gi, gj in view_groups(src, dst):
        if d not in gi:
            continue
        gi2 = [i for i in gi if src[i] != 1]
        gj2 = [j for j in gj if dst[j] != 1]
        if not gi2 or not gj2 or gi2[0] != d:
            return None
        inner_in = math.prod(src[i] for i in gi2[1:])
        inner_out = math.prod(dst[j] for j in gj2[1:])
        if (u * inner_in) % inner_out:
            return None
        u2 = u * inner_in // inner_out
        o = gj2[0]
        if dst[o] % u2 or dst[o] // u2 < 1:
            return None
        return o, u2
    return None


def _in_placements(ctx: RuleContext, m: TensorMeta):
    for d in range(m.ndim):
        for u in ctx.shard_units(m.shape[d]):
            yield d, u


@rule("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.flatten.using_ints",
      "aten.unflatten.int")
def view(node: Node, ctx: RuleContext) -> list[Candidate]:
    src = ctx.meta(node.inputs()[0])
    dst = node.out
    cands = []
    for d, u in _in_placements(ctx, src):
        m = view_map(src.shape, dst.shape, d, u)
        if m is None:
            continue
        o, u2 = m
        rewrite: tuple = ()
        if node.target in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"):
            shape = list(dst.shape)
            shape[o] = Local.of(node, o, u2)
            rewrite = ((1, shape),)
        elif node.target == "aten.unflatten.int":
            dim = norm_dim(arg(node, 1, "dim"), src.ndim)
            sizes = list(dst.shape[dim:dim + len(arg(node, 2, "sizes"))])
            if dim <= o < dim + len(sizes):
                sizes[o - dim] = Local.of(node, o, u2)
            rewrite = ((2, sizes),)
        cands.append(Candidate(f"{S(d, u)}->{S(o, u2)}", (S(d, u),), S(o, u2), rewrite=rewrite))
    cands.append(Candidate("P", (P,), P))
    return cands


def _dim_map_candidates(node: Node, ctx: RuleContext, mapping) -> list[Candidate]:
    src = ctx.meta(node.inputs()[0])
    cands = []
    for d, u in _in_placements(ctx, src):
        o = mapping(d)
        if o is None:
            continue
        cands.append(Candidate(f"{S(d, u)}->{S(o, u)}", (S(d, u),), S(o, u)))
    cands.append(Candidate("P", (P,), P))
    return cands


@rule("aten.permute.default")
def permute(node: Node, ctx: RuleContext) -> list[Candidate]:
    nd = ctx.meta(node.inputs()[0]).ndim
    dims = [norm_dim(x, nd) for x in arg(node, 1, "dims")]
    return _dim_map_candidates(node, ctx, lambda d: dims.index(d))


@rule("aten.transpose.int", "aten.t.default", "aten.swapaxes.default")
def transpose(node: Node, ctx: RuleContext) -> list[Candidate]:
    nd = ctx.meta(node.inputs()[0]).ndim
    if node.target == "aten.t.default":
        a, b = 0, max(nd - 1, 0)
    else:
        a, b = norm_dim(arg(node, 1, "dim0"), nd), norm_dim(arg(node, 2, "dim1"), nd)
    return _dim_map_candidates(node, ctx, lambda d: b if d == a else a if d == b else d)


@rule("aten.unsqueeze.default")
def unsqueeze(node: Node, ctx: RuleContext) -> list[Candidate]:
    k = norm_dim(arg(node, 1, "dim"), node.out.ndim)
    return _dim_map_candidates(node, ctx, lambda d: d + 1 if d >= k else d)


@rule("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def squeeze(node: Node, ctx: RuleContext) -> list[Candidate]:
    src = ctx.meta(node.inputs()[0])
    dims = arg(node, 1, "dim", None)
    if dims is None:
        dims = [i for i, s in enumerate(src.shape) if s == 1]
    elif isinstance(dims, int):
        dims = [dims]
    dims = [norm_dim(x, src.ndim) for x in dims if src.shape[norm_dim(x, src.ndim)] == 1]
    return _dim_map_candidates(node, ctx, lambda d: None if d in dims else d - sum(1 for x in dims if x < d))


@rule("aten.expand.default")
def expand(node: Node, ctx: RuleContext) -> list[Candidate]:
    src = ctx.meta(node.inputs()[0])
    dst = node.out
    off = dst.ndim - src.ndim
    cands = []
    for d in range(dst.ndim):
        di = d - off
        for u in ctx.shard_units(dst.shape[d]):
            sizes = list(arg(node, 1, "size"))
            sizes[d] = Local.of(node, d, u)
            if di >= 0 and src.shape[di] == dst.shape[d]:
                cands.append(Candidate(f"S({d})" if u == 1 else f"S({d}/{u})", (S(di, u),), S(d, u),
                                       rewrite=((1, sizes),)))
            elif di < 0 or src.shape[di] == 1:
                from hap.rules import R
                cands.append(Candidate(f"R->S({d})" if u == 1 else f"R->S({d}/{u})", (R,), S(d, u),
                                       rewrite=((1, sizes),)))
    return cands


@rule("aten.slice.Tensor")
def slice_(node: Node, ctx: RuleContext) -> list[Candidate]:
    src = ctx.meta(node.inputs()[0])
    dim = norm_dim(arg(node, 1, "dim", 0), src.ndim)
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    full = (start in (None, 0)) and (end is None or end >= src.shape[dim]) and step == 1
    return _dim_map_candidates(node, ctx, lambda d: d if (d != dim or full) else None)


@rule("aten.select.int")
def select(node: Node, ctx: RuleContext) -> list[Candidate]:
    src = ctx.meta(node.inputs()[0])
    dim = norm_dim(arg(node, 1, "dim"), src.ndim)
    return _dim_map_candidates(node, ctx, lambda d: None if d == dim else d - (d > dim))


@rule("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int")
def split(node: Node, ctx: RuleContext) -> list[Candidate]:
    src = ctx.meta(node.inputs()[0])
    if node.target == "aten.unbind.int":
        dim = norm_dim(arg(node, 1, "dim", 0), src.ndim)
        return _dim_map_candidates(node, ctx, lambda d: None if d == dim else d - (d > dim))
    dim = norm_dim(arg(node, 2, "dim", 0), src.ndim)
    return _dim_map_candidates(node, ctx, lambda d: None if d == dim else d)


@rule("getitem")
def getitem(node: Node, ctx: RuleContext) -> list[Candidate]:
    """An element keeps its list's placement. ``S(d)`` of a list whose elements differ in rank
    applies to the elements that have dim d; the others are replicated (embedding_bag's
    offset2bag / bag_size next to its sharded output)."""
    m = node.meta
    if not isinstance(m, TensorMeta):
        return []
    cands = []
    src = ctx.graph[node.inputs()[0]].meta
    if isinstance(src, list):
        from hap.rules import R
        for d in range(m.ndim, max(e.ndim for e in src)):
            sizes = {e.shape[d] for e in src if e.ndim > d}
            for u in sorted({u for size in sizes for u in ctx.shard_units(size)}):
                cands.append(Candidate(f"{S(d, u)}->R", (S(d, u),), R))
        if "embedding_bag" in ctx.graph[node.inputs()[0]].target and m.dtype.startswith("int"):
            # row-sharded embedding_bag (a P list) returns the full op's integer outputs on every rank
            cands.append(Candidate("P->R", (P,), R))
    for d in range(m.ndim):
        for u in ctx.shard_units(m.shape[d]):
            cands.append(Candidate(_tag(S(d, u)), (S(d, u),), S(d, u)))
    cands.append(Candidate("P", (P,), P))
    return cands


@rule("aten.cat.default")
def cat(node: Node, ctx: RuleContext) -> list[Candidate]:
    refs = node.inputs()
    dst = node.out
    dim = norm_dim(arg(node, 1, "dim", 0), dst.ndim)
    metas = [ctx.meta(r) for r in refs]
    # torch.cat skips a 1-d empty tensor (HF's DynamicCache starts as one): every rank holds it
    # whole, and the others are concatenated as if it were not there
    empty = [m.shape == (0,) and dst.ndim != 1 for m in metas]
    if any(m.ndim != dst.ndim and not e for m, e in zip(metas, empty)):
        return []

    def each(p: Placement) -> tuple[Placement, ...]:
        return tuple(R if e else p for e in empty)

    cands = []
    for d in range(dst.ndim):
        if d == dim:
            continue
        for u in ctx.shard_units(dst.shape[d]):
            cands.append(Candidate(_tag(S(d, u)), each(S(d, u)), S(d, u), split=(dst.shape[d], u)))
    cands.append(Candidate("P", each(P), P))
    return cands


@rule("aten.stack.default")
def stack(node: Node, ctx: RuleContext) -> list[Candidate]:
    refs = node.inputs()
    src = ctx.meta(refs[0])
    dim = norm_dim(arg(node, 1, "dim", 0), src.ndim + 1)
    cands = []
    for d in range(src.ndim):
        o = d + (d >= dim)
        for u in ctx.shard_units(src.shape[d]):
            cands.append(Candidate(_tag(S(o, u)), tuple(S(d, u) for _ in refs), S(o, u), split=(src.shape[d], u)))
    cands.append(Candidate("P", tuple(P for _ in refs), P))
    return cands


@rule("aten.broadcast_tensors.default")
def broadcast_tensors(node: Node, ctx: RuleContext) -> list[Candidate]:
    from hap.rules import R
    refs = node.inputs()
    outs = node.meta
    if not isinstance(outs, list) or not outs:
        return []
    dst = outs[0]
    cands = []
    for d in range(dst.ndim):
        for u in ctx.shard_units(dst.shape[d]):
            ins = []
            for r in refs:
                m = ctx.meta(r)
                di = d - (dst.ndim - m.ndim)
                ins.append(S(di, u) if di >= 0 and m.shape[di] == dst.shape[d] else R)
            if not any(p.is_shard for p in ins):
                continue
            cands.append(Candidate(_tag(S(d, u)), tuple(ins), S(d, u)))
    return cands

"""Indexing and MoE gating: gather / index_select / scatter_add / masked ops keep any dim
other than the indexed one; creation ops (arange, zeros, ...) run replicated."""
from __future__ import annotations

from hap.graph import Node
from hap.rules import Candidate, P, R, RuleContext, S, arg, norm_dim, rule


def _other_dims(node: Node, ctx: RuleContext, dim: int | None) -> list[Candidate]:
    refs = node.inputs()
    out = node.out
    cands = []
    for d in range(out.ndim):
        if d == dim:
            continue
        for u in ctx.shard_units(out.shape[d]):
            ins = []
            for r in refs:
                m = ctx.meta(r)
                ins.append(S(d, u) if m.ndim == out.ndim and m.shape[d] == out.shape[d] else R)
            cands.append(Candidate(f"S({d})" if u == 1 else f"S({d}/{u})", tuple(ins), S(d, u),
                                   split=(out.shape[d], u)))
    return cands


@rule("aten.gather.default", "aten.scatter_add.default", "aten.scatter.src", "aten.scatter.value",
      "aten.index_add.default")
def gather(node: Node, ctx: RuleContext) -> list[Candidate]:
    nd = node.out.ndim
    return _other_dims(node, ctx, norm_dim(arg(node, 1, "dim"), nd))


@rule("aten.index_select.default")
def index_select(node: Node, ctx: RuleContext) -> list[Candidate]:
    refs = node.inputs()
    x = ctx.meta(refs[0])
    dim = norm_dim(arg(node, 1, "dim"), x.ndim)
    cands = []
    for d in range(x.ndim):
        if d == dim:
            continue
        for u in ctx.shard_units(x.shape[d]):
            cands.append(Candidate(f"S({d})" if u == 1 else f"S({d}/{u})", (S(d, u), R), S(d, u),
                                   split=(x.shape[d], u)))
    return cands


@rule("aten.index.Tensor")
def index_tensor(node: Node, ctx: RuleContext) -> list[Candidate]:
    """``x[..., idx, ...]`` with one integer index tensor at dim ``p``: the output holds ``x``'s dims
    before ``p``, then ``idx``'s, then ``x``'s after ``p``. A dim of ``x`` other than ``p`` stays
    sharded (``idx`` replicated), and a dim of ``idx`` stays sharded (``x`` replicated): rows
    gathered by a sharded index are that shard's rows (the routing of tokens to experts)."""
    indices = node.args[1] if len(node.args) > 1 else []
    placed = [i for i, t in enumerate(indices) if t is not None]
    refs = node.inputs()
    if len(placed) != 1 or len(refs) != 2:
        return []
    p, x, idx = placed[0], ctx.meta(refs[0]), ctx.meta(refs[1])
    if not idx.dtype.startswith(("int", "uint")) or idx.dtype == "uint8":  # a mask's output length is data's
        return []
    cands = []
    for d in range(x.ndim):
        if d == p:
            continue
        od = d if d < p else d - 1 + idx.ndim
        for u in ctx.shard_units(x.shape[d]):
            cands.append(Candidate(f"x:S({d}/{u})", (S(d, u), R), S(od, u), split=(x.shape[d], u)))
    for j in range(idx.ndim):
        for u in ctx.shard_units(idx.shape[j]):
            cands.append(Candidate(f"idx:S({j}/{u})", (R, S(j, u)), S(p + j, u), split=(idx.shape[j], u)))
    return cands


@rule("aten.index_put_.default", "aten.index_put.default")
def index_put(node: Node, ctx: RuleContext) -> list[Candidate]:
    """``x[..., idx, ...] = values`` with one integer index tensor at dim ``p``: a dim of ``x`` other
    than ``p`` stays sharded, ``values`` sharded alike and ``idx`` replicated (the write touches
    only that shard's part of every indexed row)."""
    indices = node.args[1] if len(node.args) > 1 else []
    placed = [i for i, t in enumerate(indices) if t is not None]
    refs = node.inputs()
    if len(placed) != 1 or len(refs) != 3:
        return []
    p, x, idx, values = placed[0], ctx.meta(refs[0]), ctx.meta(refs[1]), ctx.meta(refs[2])
    if not idx.dtype.startswith(("int", "uint")) or idx.dtype == "uint8":
        return []
    full = x.shape[:p] + idx.shape + x.shape[p + 1:]  # what x[..., idx, ...] reads, values broadcast to it
    cands = []
    for d in range(x.ndim):
        if d == p:
            continue
        vd = (d if d < p else d - 1 + idx.ndim) - (len(full) - values.ndim)  # values' dim, right-aligned
        if vd < 0 or values.shape[vd] != x.shape[d]:
            continue
        for u in ctx.shard_units(x.shape[d]):
            cands.append(Candidate(f"S({d}/{u})", (S(d, u), R, S(vd, u)), S(d, u), split=(x.shape[d], u)))
    return cands


@rule("transformers.grouped_mm_fallback.default", "aten._grouped_mm.default")
def grouped_mm(node: Node, ctx: RuleContext) -> list[Candidate]:
    """One matmul per expert over its rows of ``input`` [rows, k] sorted by expert, ``weight``
    [experts, k, n], ``offs`` the rows' ends: each expert's output features can be split
    (``weight`` on n: the output on its columns), or its inner dim (``input`` and ``weight`` on k:
    partial sums). The experts themselves are split by ``hap.rules.token_wise`` (expert parallelism)."""
    refs = node.inputs()
    if len(refs) != 3:
        return []
    x, w = ctx.meta(refs[0]), ctx.meta(refs[1])
    if x.ndim != 2 or w.ndim != 3:
        return []
    cands = [Candidate(f"cols/{u}", (R, S(2, u), R), S(1, u), split=(w.shape[2], u))
             for u in ctx.shard_units(w.shape[2], may_be_batch=False)]
    cands += [Candidate(f"inner/{u}", (S(1, u), S(1, u), R), P, split=(w.shape[1], u))
              for u in ctx.shard_units(w.shape[1], may_be_batch=False)]
    return cands


@rule("aten.arange.default", "aten.arange.start", "aten.arange.start_step", "aten.zeros.default",
      "aten.ones.default", "aten.full.default", "aten.empty.memory_format", "aten.scalar_tensor.default",
      "aten.eye.default", "aten.linspace.default", "torch.tensor")
def creation(node: Node, ctx: RuleContext) -> list[Candidate]:
    """Tensors made from nothing (and metadata asserts) are cheap: every rank makes its own."""
    return []


@rule("aten._assert_tensor_metadata.default")
def assert_metadata(node: Node, ctx: RuleContext) -> list[Candidate]:
    """export's check of a tensor's dtype, device and layout (before a ``.to``) holds for any
    shard or partial sum of it, so it reads the tensor where it lies; a check of its size or
    strides holds only for the whole tensor. It has no output: its placement is its input's."""
    if any(node.kwargs.get(k) is not None for k in ("size", "stride")) or \
            any(a is not None for a in node.args[1:3]):
        return []
    x = ctx.meta(node.inputs()[0])
    cands = [Candidate("P", (P,), P)]
    for d in range(x.ndim):
        for u in ctx.shard_units(x.shape[d]):
            cands.append(Candidate(f"S({d})" if u == 1 else f"S({d}/{u})", (S(d, u),), S(d, u)))
    return cands

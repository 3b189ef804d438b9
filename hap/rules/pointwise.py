"""Pointwise ops with broadcasting: shard any output dim; linear ops also pass P."""
from __future__ import annotations

from hap.graph import Node, TensorMeta
from hap.rules import Candidate, P, R, RuleContext, S, rule

UNARY = [
    "relu", "gelu", "silu", "sigmoid", "tanh", "exp", "log", "neg", "abs", "sqrt", "rsqrt", "sin", "cos",
    "reciprocal", "square", "erf", "log1p", "expm1", "softplus", "leaky_relu", "elu", "hardtanh", "mish",
    "hardswish", "hardsigmoid", "logical_not", "bitwise_not", "isnan", "isinf", "sign", "floor", "ceil",
    "round", "relu6", "celu", "selu", "glu", "log_sigmoid", "clamp", "clamp_min", "clamp_max", "pow",
    "dropout", "native_dropout", "clone", "_to_copy", "to", "type_as", "contiguous", "detach", "alias",
    "lift_fresh_copy", "masked_fill", "where", "add", "sub", "mul", "div", "rsub", "maximum", "minimum",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "bitwise_and", "bitwise_or",
    "floor_divide", "remainder", "fmod", "atan2", "lerp", "addcmul", "addcdiv", "copy", "fill",
    "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "empty_like", "bernoulli",
    "nan_to_num", "triu", "tril",
]
# ops that are linear in their (first / all tensor) inputs, so partial sums pass through
LINEAR_ALL = {"add", "sub", "neg", "clone", "_to_copy", "to", "contiguous", "detach", "alias", "type_as"}
LINEAR_FIRST = {"mul", "div"}
NO_SHARD_LAST2 = {"triu", "tril"}  # the diagonal offset depends on the position in the last two dims


def _base(target: str) -> str:
    return target.split(".")[1].rstrip("_")


def _adds_constant(node: Node, base: str) -> bool:
    """``x + 1.0`` (a number operand) is not linear: on partial sums every rank would add it."""
    if base not in ("add", "sub"):
        return False
    return any(not isinstance(a, dict) and a not in (0, 0.0, None) for a in node.args[:2])


def pointwise_candidates(node: Node, ctx: RuleContext) -> list[Candidate]:
    out = node.meta if isinstance(node.meta, TensorMeta) else (node.meta[0] if node.meta else None)
    if out is None:
        return []
    refs = node.inputs()
    metas = [ctx.meta(r) for r in refs]
    base = _base(node.target)
    cands: list[Candidate] = []
    nd = out.ndim
    for d in range(nd):
        if base in NO_SHARD_LAST2 and d >= nd - 2:
            continue
        for u in ctx.shard_units(out.shape[d]):
            ins = []
            ok = True
            for m in metas:
                di = d - (nd - m.ndim)
                if di < 0 or m.shape[di] == 1:
                    ins.append(R)  # broadcast along d: every rank needs the whole (size-1) input
                elif m.shape[di] == out.shape[d]:
                    ins.append(S(di, u))
                else:
                    ok = False
            if ok and any(p.is_shard for p in ins):
                cands.append(Candidate(f"S({d})" if u == 1 else f"S({d}/{u})", tuple(ins), S(d, u),
                                       split=(out.shape[d], u)))
    if not out.is_float:  # a cast to integers truncates: not linear, so partial sums do not pass
        return cands
    if base in LINEAR_ALL and refs and not _adds_constant(node, base):
        cands.append(Candidate("P", tuple(P for _ in refs), P))
    elif base in LINEAR_FIRST and refs and node.args and node.args[0] == {"node": refs[0]}:
        cands.append(Candidate("P", (P,) + tuple(R for _ in refs[1:]), P))
    return cands


@rule(*[f"aten.{b}.{o}" for b in UNARY for o in ("default", "Tensor", "Scalar", "self", "ScalarOpt",
                                                    "Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor",
                                                    "dtype", "dtype_layout", "int", "other", "Scalar_Other")])
def pointwise(node: Node, ctx: RuleContext) -> list[Candidate]:
    return pointwise_candidates(node, ctx)


@rule(*[f"aten.{b}_.{o}" for b in UNARY for o in ("default", "Tensor", "Scalar")])
def in_place(node: Node, ctx: RuleContext) -> list[Candidate]:
    """In-place updates (BatchNorm's num_batches_tracked += 1) run on every rank's own replica."""
    return []


@rule("aten.pad.default", "aten.constant_pad_nd.default")
def pad(node: Node, ctx: RuleContext) -> list[Candidate]:
    """Padding changes only the dims it pads (``pad`` lists (before, after) pairs from the last
    dim backwards): any other dim may stay sharded, HF's label shifting keeps its batch split."""
    x = ctx.meta(node.inputs()[0])
    pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", [])
    padded = {x.ndim - 1 - i // 2 for i, p in enumerate(pads) if p}
    cands = []
    for d in range(x.ndim):
        if d in padded:
            continue
        for u in ctx.shard_units(x.shape[d]):
            cands.append(Candidate(f"S({d})" if u == 1 else f"S({d}/{u})", (S(d, u),), S(d, u),
                                   split=(x.shape[d], u)))
    return cands


@rule("aten.minimum.default", "aten.min.other", "aten.max.other", "aten.to.device", "aten.where.ScalarOther",
      "aten.where.ScalarSelf", "aten.where.Scalar")
def pointwise_overloads(node: Node, ctx: RuleContext) -> list[Candidate]:
    """Elementwise overloads whose op names also have reductions (``min.other`` beside
    ``min.default``), registered one by one."""
    return pointwise_candidates(node, ctx)

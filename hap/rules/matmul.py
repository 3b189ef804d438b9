"""Matrix products: linear, mm, bmm, matmul, addmm, baddbmm, einsum.

Each is an einsum over index letters. Sharding a letter that the output keeps gives an
``S`` output (data parallel on a batch letter, column parallel on an output feature);
sharding a contracted letter gives a partial sum ``P`` (row parallel), and additive
inputs (a bias) must then enter as ``P`` so the bias is added once.
"""
from __future__ import annotations

import string

from hap.graph import Node
from hap.rules import Candidate, P, R, RuleContext, S, rule


def einsum_candidates(node: Node, ctx: RuleContext, subs: list[str], out_sub: str, sizes: dict[str, int],
                      additive: list[int] = ()) -> list[Candidate]:
    """``subs[i]`` is the index string of tensor input i (``""`` for an additive 0-d/broadcast input),
    ``additive`` the inputs added to the product (biases): they follow the output's placement."""
    cands = []
    for letter, size in sizes.items():
        for u in ctx.shard_units(size):
            if not all(sub.count(letter) <= 1 for sub in subs):
                continue
            ins = []
            for i, sub in enumerate(subs):
                if i in additive:
                    continue
                ins.append(S(sub.index(letter), u) if letter in sub else R)
            if letter in out_sub:
                out = S(out_sub.index(letter), u)
            else:
                out = P
            full = []
            k = 0
            for i, sub in enumerate(subs):
                if i in additive:
                    if out.kind == "P":
                        full.append(P)
                    else:
                        ad = sub
                        full.append(S(ad.index(letter), u) if letter in ad else R)
                else:
                    full.append(ins[k])
                    k += 1
            tag = "P" if out.kind == "P" else str(out)
            name = f"{letter}:{tag}" if u == 1 else f"{letter}/{u}:{tag}"
            cands.append(Candidate(name, tuple(full), out, split=(size, u)))
    return cands


def _letters(n: int, skip: str = "") -> str:
    return "".join(c for c in string.ascii_lowercase if c not in skip)[:n]


@rule("aten.linear.default")
def linear(node: Node, ctx: RuleContext) -> list[Candidate]:
    refs = node.inputs()
    x, w = ctx.meta(refs[0]), ctx.meta(refs[1])
    lead = _letters(x.ndim - 1, "kn")
    subs = [lead + "k", "nk"] + (["n"] if len(refs) > 2 else [])
    sizes = {c: s for c, s in zip(lead + "k", x.shape)} | {"n": w.shape[0]}
    return einsum_candidates(node, ctx, subs, lead + "n", sizes, additive=[2] if len(refs) > 2 else [])


def _batched(a_nd: int, b_nd: int) -> tuple[str, str, str]:
    """Index strings of torch.matmul's operands and result (with broadcasting batch dims)."""
    if a_nd == 1 and b_nd == 1:
        return "k", "k", ""
    nb = max(a_nd, b_nd) - 2
    batch = _letters(max(nb, 0), "mkn")
    a = (batch[nb - (a_nd - 2):] if a_nd > 2 else "") + ("mk" if a_nd >= 2 else "k")
    b = (batch[nb - (b_nd - 2):] if b_nd > 2 else "") + ("kn" if b_nd >= 2 else "k")
    out = batch + ("m" if a_nd >= 2 else "") + ("n" if b_nd >= 2 else "")
    return a, b, out


@rule("aten.mm.default", "aten.bmm.default", "aten.matmul.default")
def matmul(node: Node, ctx: RuleContext) -> list[Candidate]:
    refs = node.inputs()
    a, b = ctx.meta(refs[0]), ctx.meta(refs[1])
    sa, sb, so = _batched(a.ndim, b.ndim)
    sizes: dict[str, int] = {}
    for sub, m in ((sa, a), (sb, b)):
        for c, s in zip(sub, m.shape):
            sizes[c] = max(sizes.get(c, 1), s)
    # broadcast batch dims of size 1 cannot be sharded in that operand
    for sub, m in ((sa, a), (sb, b)):
        for c, s in zip(sub, m.shape):
            if s == 1 and sizes[c] > 1:
                sizes.pop(c, None)
    return einsum_candidates(node, ctx, [sa, sb], so, sizes)


@rule("aten.addmm.default", "aten.baddbmm.default")
def addmm(node: Node, ctx: RuleContext) -> list[Candidate]:
    refs = node.inputs()
    if len(refs) != 3 or len(set(refs)) != 3:
        return []
    bias, a, b = (ctx.meta(r) for r in refs)
    sa, sb, so = _batched(a.ndim, b.ndim)
    if bias.ndim != len(so) or bias.shape != tuple(node.out.shape):
        sub_bias = so[len(so) - bias.ndim:] if bias.ndim else ""
        if any(s == 1 for s in bias.shape):
            return []
    else:
        sub_bias = so
    sizes = {c: s for sub, m in ((sa, a), (sb, b)) for c, s in zip(sub, m.shape)}
    return einsum_candidates(node, ctx, [sub_bias, sa, sb], so, sizes, additive=[0])


@rule("aten.einsum.default")
def einsum(node: Node, ctx: RuleContext) -> list[Candidate]:
    eq = str(node.args[0]).replace(" ", "")
    if "->" not in eq or "." in eq:
        return []
    lhs, out_sub = eq.split("->")
    subs = lhs.split(",")
    refs = node.inputs()
    if len(subs) != len(refs):
        return []
    sizes = {}
    for sub, r in zip(subs, refs):
        for c, s in zip(sub, ctx.meta(r).shape):
            if s == 1 and sizes.get(c, 1) == 1:
                sizes[c] = 1
            else:
                sizes[c] = s
    sizes = {c: s for c, s in sizes.items() if s > 1
             and all(ctx.meta(r).shape[sub.index(c)] == s for sub, r in zip(subs, refs) if c in sub)}
    return einsum_candidates(node, ctx, subs, out_sub, sizes)

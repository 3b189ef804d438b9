"""scaled_dot_product_attention: shard the batch or the heads (any leading dim of q/k/v)."""
from __future__ import annotations

from hap.graph import Node
from hap.rules import Candidate, R, RuleContext, S, rule


@rule("aten.scaled_dot_product_attention.default")
def sdpa(node: Node, ctx: RuleContext) -> list[Candidate]:
    refs = node.inputs()
    q = ctx.meta(refs[0])
    out = node.out
    cands = []
    for d in range(q.ndim - 2):
        for u in ctx.shard_units(q.shape[d]):
            ins = []
            ok = True
            for i, r in enumerate(refs):
                m = ctx.meta(r)
                di = d - (q.ndim - m.ndim)
                if i < 3:
                    if m.shape[di] != q.shape[d]:
                        ok = False  # grouped-query attention: k/v have fewer heads
                    ins.append(S(di, u))
                else:  # attention mask: broadcast or sharded alike
                    ins.append(S(di, u) if di >= 0 and m.shape[di] == q.shape[d] else R)
            if ok:
                cands.append(Candidate(f"S({d})" if u == 1 else f"S({d}/{u})", tuple(ins), S(d, u),
                                       split=(out.shape[d], u)))
    return cands

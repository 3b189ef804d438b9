"""Losses over a sharded batch: each rank computes its local SUM, divided by the GLOBAL
count, giving P (never a mean of local means). Cross-entropy / NLL with ignore_index or
class weights all-reduce the denominator (a scalar) at run time."""
from __future__ import annotations

from typing import Any

from hap.graph import Node
from hap.rules import Candidate, P, R, RuleContext, S, arg, is_ref, renders, rule

# target -> position of the `reduction` argument
REDUCTION_ARG = {
    "aten.cross_entropy_loss.default": 3,
    "aten.nll_loss.default": 3,
    "aten.nll_loss2d.default": 3,
    "aten.nll_loss_nd.default": 3,
    "aten.mse_loss.default": 2,
    "aten.l1_loss.default": 2,
    "aten.smooth_l1_loss.default": 2,
    "aten.huber_loss.default": 2,
    "aten.binary_cross_entropy.default": 3,
    "aten.binary_cross_entropy_with_logits.default": 4,
    "aten.kl_div.default": 2,
    "aten.soft_margin_loss.default": 2,
}
CLASS_LOSSES = ("aten.cross_entropy_loss.default", "aten.nll_loss.default", "aten.nll_loss2d.default",
                "aten.nll_loss_nd.default")


@rule(*REDUCTION_ARG)
def loss(node: Node, ctx: RuleContext) -> list[Candidate]:
    refs = node.inputs()
    x = ctx.meta(refs[0])
    red = arg(node, REDUCTION_ARG[node.target], "reduction", 1)
    cands = []
    if node.target in CLASS_LOSSES:
        # input [N, C, d1...] / target [N, d1...]; the class dim 1 is not shardable
        dims = [d for d in range(x.ndim) if d != 1] if x.ndim > 1 else []
        tdim = {d: (d if d == 0 else d - 1) for d in dims}
        weight_ref = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    else:
        dims = list(range(x.ndim))
        tdim = {d: d for d in dims}
        weight_ref = None
    for d in dims:
        for u in ctx.shard_units(x.shape[d]):
            ins = []
            for i, r in enumerate(refs):
                m = ctx.meta(r)
                if i == 0:
                    ins.append(S(d, u))
                elif weight_ref == {"node": r} and node.target in CLASS_LOSSES:
                    ins.append(R)
                else:
                    td = tdim[d] if node.target in CLASS_LOSSES and i == 1 else d - (x.ndim - m.ndim)
                    ins.append(S(td, u) if td >= 0 and m.shape[td] == x.shape[d] else R)
            name = f"S({d})" if u == 1 else f"S({d}/{u})"
            if red == 0:  # none: elementwise
                cands.append(Candidate(name, tuple(ins), S(tdim[d], u), split=(x.shape[d], u)))
            else:
                cands.append(Candidate(name + "->P", tuple(ins), P, split=(x.shape[d], u),
                                       emit="loss_partial" if red == 1 else "call"))
    return cands


@renders("loss_partial")
def loss_partial(em, node: Node, cand: Candidate, refs: list[str]) -> str:
    """A mean loss over a sharded batch: this rank's summed loss divided by the global count
    (for class losses, the global count of targets that are not ignored, or their weights)."""
    ridx = REDUCTION_ARG[node.target]
    args = list(node.args)
    while len(args) <= ridx:
        args.append(_default_arg(node.target, len(args)))
    args[ridx] = 2  # sum
    kwargs = {k: v for k, v in node.kwargs.items() if k != "reduction"}
    summed = em.call(node, cand, refs, args, kwargs)
    if node.target in CLASS_LOSSES:
        target_meta = em.graph[node.inputs()[1]].out
        if target_meta.is_float:  # class probabilities: every sample counts
            x = em.graph[node.inputs()[0]].out
            return f"{summed} / {x.numel // x.shape[1] if x.ndim > 1 else 1}"
        weight = args[2] if len(args) > 2 else None
        ignore = args[4] if len(args) > 4 and not is_ref(args[4]) else -100
        wexpr = refs[node.inputs().index(weight["node"])] if is_ref(weight) else "None"
        total = em.graph[node.inputs()[1]].out.numel  # the global batch's targets: micro-batches' stand-in
        return f"{summed} / class_loss_count({refs[1]}, {wexpr}, {ignore!r}, {total})"
    x = em.graph[node.inputs()[0]].out
    return f"{summed} / {x.numel}"


def _default_arg(target: str, i: int) -> Any:
    """The default of positional argument ``i`` of a loss op, where the capture left it out."""
    if target in CLASS_LOSSES:
        return [None, None, None, 1, -100, 0.0][i]
    if target == "aten.binary_cross_entropy_with_logits.default":
        return [None, None, None, None, 1][i]
    return None

"""Normalisation: layer_norm / rms_norm shard leading dims; batch_norm shards the batch
(synchronised statistics) or runs replicated; group_norm shards the batch."""
from __future__ import annotations

from hap.graph import Node
from hap.rules import Candidate, R, RuleContext, S, arg, renders, rule


def _leading(node: Node, ctx: RuleContext, n_norm: int) -> list[Candidate]:
    refs = node.inputs()
    x = ctx.meta(refs[0])
    cands = []
    for d in range(x.ndim - n_norm):
        for u in ctx.shard_units(x.shape[d]):
            ins = tuple(S(d, u) if i == 0 or r == refs[0] else R for i, r in enumerate(refs))
            cands.append(Candidate(f"S({d})" if u == 1 else f"S({d}/{u})", ins, S(d, u), split=(x.shape[d], u)))
    return cands


@rule("aten.layer_norm.default", "aten.rms_norm.default")
def layer_norm(node: Node, ctx: RuleContext) -> list[Candidate]:
    shape = arg(node, 1, "normalized_shape")
    return _leading(node, ctx, len(shape))


@rule("aten.group_norm.default")
def group_norm(node: Node, ctx: RuleContext) -> list[Candidate]:
    x = ctx.meta(node.inputs()[0])
    return [c for c in _leading(node, ctx, x.ndim - 1)]


@rule("aten.batch_norm.default")
def batch_norm(node: Node, ctx: RuleContext) -> list[Candidate]:
    """batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)."""
    refs = node.inputs()
    x = ctx.meta(refs[0])
    training = bool(arg(node, 5, "training", False))
    cands = []
    for u in ctx.shard_units(x.shape[0]):
        if u != 1:
            continue
        ins = tuple(S(0) if r == refs[0] else R for r in refs)
        cands.append(Candidate("S(0)", ins, S(0), split=(x.shape[0], 1),
                               emit="sync_batch_norm" if training else "call"))
    return cands


@renders("sync_batch_norm")
def sync_batch_norm(em, node: Node, cand: Candidate, refs: list[str]) -> str:
    """BatchNorm in training mode over a sharded batch: global statistics (hr.sync_batch_norm)."""
    refs_it = list(refs)
    vals = [em.render(x, refs_it) for x in node.args[:8]]
    _, ls = em.tensor_lengths(node.inputs()[0], S(0))
    return (f"hr.sync_batch_norm({vals[0]}, {vals[1]}, {vals[2]}, {vals[3]}, {vals[4]}, "
            f"training={vals[5]}, momentum={vals[6]}, eps={vals[7]}, lengths={ls})")

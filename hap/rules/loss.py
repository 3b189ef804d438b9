"""Losses over a sharded batch: each rank computes its local SUM, divided by the GLOBAL
count, giving P (never a mean of local means). Cross-entropy / NLL with ignore_index or
class weights all-reduce the denominator (a scalar) at run time.

A cross-entropy that reads a model's logits through casts and views only (a language model's
``logits.float().view(-1, V)``) runs in chunks of rows (``chunked_losses``,
``hap.runtime.chunked_loss``): the program keeps the logits as the model made them and their
gradient, not their fp32 copy, log-softmax and gradients, and the cost model counts that."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hap.graph import Graph, Node, TensorMeta
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


# ops between the logits and a cross-entropy that change neither a row's values nor the rows
# (dtype casts and views that keep the class dim last)
CHAIN_OPS = {"aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default", "aten.view.default",
             "aten.reshape.default", "aten._unsafe_view.default", "aten.contiguous.default", "aten.alias.default",
             "aten.clone.default"}
ASSERT = "aten._assert_tensor_metadata.default"
CAST_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class ChunkedLoss:
    """A cross-entropy run in chunks of rows: ``logits`` (the model's tensor, classes last) read
    through ``chain`` (casts and views, in order) by the loss node."""
    loss: str
    logits: str
    chain: tuple[str, ...]
    skipped: tuple[str, ...]  # the chain and the metadata asserts that read it: not emitted
    dtype: str  # the dtype the loss reads the logits in
    ignore_index: int


def chunked_losses(graph: Graph) -> dict[str, ChunkedLoss]:
    """The graph's cross-entropies that run in chunks (module docstring), by loss node: a mean or
    summed ``cross_entropy`` without class weights or label smoothing, of 2-D input [rows,
    classes] and 1-D integer target, whose input is the logits' only reader through a chain of
    casts and views keeping the classes last."""
    users = graph.users()
    out: dict[str, ChunkedLoss] = {}
    for node in graph.ops():
        found = _chunked(graph, node, users)
        if found is not None:
            out[node.name] = found
    return out


def _chunked(graph: Graph, node: Node, users: dict[str, list[str]]) -> ChunkedLoss | None:
    if node.target != "aten.cross_entropy_loss.default" or len(node.inputs()) != 2:
        return None
    x_ref, t_ref = node.inputs()
    weight, red = arg(node, 2, "weight"), arg(node, 3, "reduction", 1)
    ignore, smoothing = arg(node, 4, "ignore_index", -100), arg(node, 5, "label_smoothing", 0.0)
    x, t = graph[x_ref].meta, graph[t_ref].meta
    if weight is not None or red not in (1, 2) or type(ignore) is not int or smoothing not in (0, 0.0) or \
            not isinstance(x, TensorMeta) or not isinstance(t, TensorMeta) or x.ndim != 2 or t.ndim != 1 or \
            t.is_float or x.dtype not in CAST_DTYPES:
        return None
    classes = x.shape[1]

    def one_reader(name: str, reader: str) -> bool:
        return [u for u in users[name] if graph[u].target != ASSERT] == [reader]

    chain: list[str] = []
    skipped: list[str] = []
    cur, reader = x_ref, node.name
    while graph[cur].kind == "op" and graph[cur].target in CHAIN_OPS:
        meta = graph[cur].meta
        if not one_reader(cur, reader) or not isinstance(meta, TensorMeta) or not meta.shape or \
                meta.shape[-1] != classes:
            return None
        chain.append(cur)
        skipped += [cur] + [u for u in users[cur] if graph[u].target == ASSERT]
        cur, reader = graph[cur].inputs()[0], cur
    meta = graph[cur].meta
    if graph[cur].kind != "op" or not isinstance(meta, TensorMeta) or meta.ndim < 2 or \
            meta.shape[-1] != classes or not one_reader(cur, reader):
        return None
    return ChunkedLoss(node.name, cur, tuple(reversed(chain)), tuple(skipped), x.dtype, ignore)


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


def mean_loss(node: Node) -> bool:
    """Whether ``node`` is a loss op that takes the mean over its batch (reduction "mean")."""
    return node.target in REDUCTION_ARG and arg(node, REDUCTION_ARG[node.target], "reduction", 1) == 1


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
        return f"{summed} / {_global_count(em, node, refs[1], wexpr, ignore)}"
    x = em.graph[node.inputs()[0]].out
    return f"{summed} / {x.numel}"


def _global_count(em, node: Node, target: str, weight: str, ignore: Any) -> str:
    total = em.graph[node.inputs()[1]].out.numel  # the global batch's targets: micro-batches' stand-in
    return f"class_loss_count({target}, {weight}, {ignore!r}, {total})"


def chain_unmoved(c: ChunkedLoss, choice: dict[str, Candidate]) -> bool:
    """Whether the plan reads every tensor of the chunked loss's chain as its producer holds it
    (the search forbids moves there: ``hap.solve``)."""
    names = [*c.chain, c.loss]
    return all(x in choice for x in names) and \
        all(choice[b].inputs[0] == choice[a].output for a, b in zip(names, names[1:]))


def chunked_loss(em, node: Node, cand: Candidate, refs: list[str], c: ChunkedLoss) -> str:
    """The loss of ``c`` by ``hr.chunked_cross_entropy`` from the logits as the chain's first op
    reads them, divided as the whole loss would be: by the global count of targets over a sharded
    batch, by this rank's count for a mean it computes whole."""
    first = c.chain[0] if c.chain else c.loss
    logits = em.ref(c.logits, em.choice[first].inputs[0], node.source or node.name)
    summed = f"hr.chunked_cross_entropy({logits}, {refs[1]}, {c.ignore_index!r}, torch.{c.dtype})"
    if arg(node, 3, "reduction", 1) == 2:
        return summed
    if cand.emit == "loss_partial" or em.splitter.num_ranks == 1:  # one rank's batch is the global batch
        return f"{summed} / {_global_count(em, node, refs[1], 'None', c.ignore_index)}"
    return f"{summed} / ({refs[1]} != {c.ignore_index!r}).sum()"


def _default_arg(target: str, i: int) -> Any:
    """The default of positional argument ``i`` of a loss op, where the capture left it out."""
    if target in CLASS_LOSSES:
        return [None, None, None, 1, -100, 0.0][i]
    if target == "aten.binary_cross_entropy_with_logits.default":
        return [None, None, None, None, 1][i]
    return None

"""Token-wise modules: the ops of one call run together on each rank's own tokens.

Some modules route tokens through ops that have no sharding rule one by one. transformers'
experts modules sort the (token, expert) pairs by expert (``sort``), gather the tokens in that
order (``index``), count each expert's tokens (``histc``), run one grouped matmul per expert
(``transformers.grouped_mm_fallback``) and put the rows back in token order (``index_put_``,
``index``). A sorted tensor is not a slice of the globally sorted tensor, so no op of the chain
can be sharded on its own. The call as a whole is token-wise (``hap.capture.is_token_wise``):
each output row depends only on the same token's inputs. Run on a rank's own rows, the chain
computes exactly that rank's rows of the output, as a micro-batch does.

So every op of such a call gets one candidate, ``rows``: each input and output that follows
the batch is sharded on its batch dim, parameters and fixed-size tensors are replicated, and
every size argument that follows the batch is the rank's own (``Local`` with the batch
factor). The candidates of one call only fit together: a tensor inside it is this rank's
version, not a shard of the global one, so it is never moved, only read by the call's own ops;
what leaves the call is its output, which is a true shard. A call that cannot be run that way
(a batch size that is not a multiple of the batch, a tensor inside read outside) keeps the
per-op candidates, and ``call_rows`` says why.

An experts call whose form the expert-parallel program knows (``Graph.experts``) also gets
``experts``: its expert weights stay sharded on the expert dim (a faster rank holds more experts)
and its output is computed by ``hap.runtime.experts.experts_parallel``, which sends each
(token, choice) pair to the rank holding its expert and back (all-to-all). The call's last op
emits that (``emit="experts"``), the others nothing; the inside tensors keep the labels of
``rows``, so the two candidates differ only in the expert weights' placement and the emitted code.
The search solves the two as separate attempts (``hap.search``), so one call never mixes them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from hap.graph import Graph, Node, TensorMeta
from hap.placement import Placement, R, S
from hap.rules import RENDERERS, Candidate, Local, RuleContext
from hap.runtime.experts import ACTIVATIONS

ROWS = "rows"
EXPERTS = "experts"


def regions(graph: Graph) -> dict[str, list[str]]:
    """Each token-wise module call: its op nodes, in graph order."""
    out: dict[str, list[str]] = {}
    for n in graph:
        if n.kind == "op" and n.token_wise:
            out.setdefault(n.token_wise, []).append(n.name)
    return out


def batch_dim(node: Node) -> int | None:
    """The dim of ``node``'s (first) output that holds ``f`` rows per sample (``f*B`` elements),
    None where no dim follows the batch. Raises ValueError where the rows cannot be split by
    sample: two dims follow the batch, or one follows it with a constant added."""
    dims = [(d, fc) for d, fc in enumerate(node.batch_dims or []) if fc and fc[0]]
    if not dims:
        return None
    if len(dims) > 1 or dims[0][1][1] != 0:
        raise ValueError(f"{node.name} has sizes {node.batch_dims} in the batch B")
    return dims[0][0]


def _rows_args(node: Node) -> tuple[tuple[int, Any], ...]:
    """Rewrites of ``node``'s positional arguments: each size that follows the batch becomes the
    rank's own (``Local`` with its batch factor)."""
    args = list(node.args)
    touched: set[int] = set()
    for path, (f, c) in sorted(node.batch_args.items()):
        if path.startswith("k.") or c:
            raise ValueError(f"{node.name} takes the size {path} = {f}*B{c:+d}")
        keys = [int(k) for k in path.split(".")]
        touched.add(keys[0])
        holder: Any = args
        for k in keys[:-1]:
            holder[k] = list(holder[k])
            holder = holder[k]
        size = holder[keys[-1]]
        holder[keys[-1]] = Local(size, 1, batch=(f, 0))
    return tuple((i, args[i]) for i in sorted(touched))


def rows_placement(node: Node) -> Placement:
    """How a call run on each rank's rows holds ``node``'s output: sharded on its batch dim, or
    replicated (a parameter, a buffer, a tensor whose sizes do not follow the batch)."""
    d = None if node.kind in ("param", "buffer") else batch_dim(node)
    return R if d is None else S(d)


def rows_candidate(graph: Graph, node: Node) -> Candidate:
    """``node`` run on this rank's rows (raises ValueError where it cannot be)."""
    ins = tuple(rows_placement(graph[name]) for name in node.inputs())
    out = rows_placement(node)
    if isinstance(node.meta, list) and out.is_shard and \
            any(m.shape[out.dim] != node.meta[0].shape[out.dim] for m in node.meta):
        raise ValueError(f"{node.name} returns tensors of other lengths on the batch")
    split = None  # the work divides as the rows of its output, else of its first input that follows the batch
    for name, p in [(node.name, out), *zip(node.inputs(), ins)]:
        meta = graph[name].meta[0] if isinstance(graph[name].meta, list) else graph[name].meta
        if p.is_shard and isinstance(meta, TensorMeta):
            split = (meta.shape[p.dim], 1)
            break
    return Candidate(ROWS, ins, out, split=split, rewrite=_rows_args(node))


def call_rows(graph: Graph, names: list[str], users: dict[str, list[str]]) -> dict[str, Candidate] | str:
    """The ``rows`` candidate of every op of the call of ``names``, or why the call cannot run on
    each rank's rows."""
    if not graph.batch_size:
        return "the model does not capture at twice the batch, so no size is known to follow it"
    inside, out = set(names), {}
    for name in names:
        try:
            out[name] = rows_candidate(graph, graph[name])
        except ValueError as e:
            return str(e)
        if any(u not in inside for u in users[name]) and not out[name].output.is_shard:
            return f"{name}, read after the call, does not follow the batch"
    return out


def experts_candidates(graph: Graph, module: str, rows: dict[str, Candidate], users: dict[str, list[str]],
                       ctx: RuleContext) -> dict[str, Candidate] | str:
    """The ``experts`` candidate of each op of the experts call of ``module`` (whose ``rows``
    candidates these are), or why it has none."""
    form = graph.experts.get(module)
    if form is None:
        return "hap knows no expert-parallel form of it"
    names, inside = list(rows), set(rows)
    outside = list(dict.fromkeys(i for n in names for i in graph[n].inputs() if i not in inside))
    weights = {graph[i].target.removeprefix(module + "."): i for i in outside if graph[i].kind == "param"}
    if set(weights) != {"gate_up_proj", "down_proj"}:
        return f"it reads the parameters {sorted(weights)}, not gate_up_proj and down_proj"
    hidden = graph[weights["gate_up_proj"]].out.shape[-1]
    tensors = [i for i in outside if graph[i].kind != "param" and isinstance(graph[i].meta, TensorMeta)]
    x = [i for i in tensors if graph[i].out.is_float and graph[i].out.shape[-1] == hidden]
    idx = [i for i in tensors if not graph[i].out.is_float]
    w = [i for i in tensors if graph[i].out.is_float and i not in x]
    if not (len(x) == len(idx) == len(w) == 1):
        return "its inputs are not one each of hidden states, expert indices and routing weights"
    ends = [n for n in names if any(u not in inside for u in users[n])]
    if len(ends) != 1:
        return f"{len(ends)} of its tensors are read after it"
    experts = form["experts"]
    if 0 in ctx.splitter.lengths(experts):
        return f"its {experts} experts cannot be split over {ctx.num_ranks} ranks without an empty range"
    grouped = [graph[n].target for n in names
               if graph[n].op_class == "matmul" and graph[n].target != "aten.linear.default"]
    out = {}
    for name, own in rows.items():
        ins = tuple(S(0) if i in weights.values() else p for i, p in zip(graph[name].inputs(), own.inputs))
        last = name == ends[0]
        out[name] = dataclasses.replace(
            own, name=EXPERTS, inputs=ins, emit=EXPERTS if last else "elided",
            extra=(x[0], idx[0], w[0], weights["gate_up_proj"], weights["down_proj"], experts, form["act"],
                   grouped[0]) if last else ())
    return out


def token_wise_candidates(graph: Graph, ctx: RuleContext | None = None
                          ) -> tuple[dict[str, list[Candidate]], dict[str, str]]:
    """The candidates of every op of each token-wise call that can run on each rank's rows
    (``rows``; with ``ctx``, also ``experts`` where the call's experts can be sharded), and, for
    each call that cannot, why."""
    users = graph.users()
    out: dict[str, list[Candidate]] = {}
    refused: dict[str, str] = {}
    for module, names in regions(graph).items():
        rows = call_rows(graph, names, users)
        if isinstance(rows, str):
            refused[module] = rows
            continue
        ep = experts_candidates(graph, module, rows, users, ctx) if ctx is not None and ctx.num_ranks > 1 else {}
        for name, own in rows.items():
            out[name] = [own] + ([ep[name]] if isinstance(ep, dict) and ep else [])
    return out, refused


def expert_parallel_calls(graph: Graph, ctx: RuleContext) -> dict[str, str | None]:
    """Each token-wise call: None where its experts can be sharded, else why not."""
    users = graph.users()
    out: dict[str, str | None] = {}
    for module, names in regions(graph).items():
        rows = call_rows(graph, names, users)
        ep = rows if isinstance(rows, str) else experts_candidates(graph, module, rows, users, ctx)
        out[module] = ep if isinstance(ep, str) else None
    return out


def _render_elided(em, node: Node, cand: Candidate, refs: list[str]) -> str:
    return ""


def _render_experts(em, node: Node, cand: Candidate, refs: list[str]) -> str:
    """The call's output from ``hr.experts_parallel``, reading the call's inputs (converted where the
    call's first op read them) and this rank's range of the experts."""
    from hap.emit import callee, check_target
    from hap.errors import PlanFileError

    x, idx, w, gate_up, down, experts, act, grouped = cand.extra
    # the plan's record of the call is data: names of its own tensors, a known activation, and a
    # registered op (a plan.json edited to call anything else is refused)
    if not all(isinstance(n, str) and n in em.graph for n in (x, idx, w, gate_up, down)) or \
            act not in ACTIVATIONS:
        raise PlanFileError(f"node {node.name!r}: its experts call names {cand.extra!r}; re-plan rather than "
                            "editing plan.json")
    check_target(grouped, node.name)
    src = node.source or node.name
    args = [em.ref(x, rows_placement(em.graph[x]), src), em.ref(idx, rows_placement(em.graph[idx]), src),
            em.ref(w, rows_placement(em.graph[w]), src), em.ref(gate_up, S(0), src), em.ref(down, S(0), src)]
    _, lengths = em.tensor_lengths(gate_up, S(0))
    return f"hr.experts_parallel({', '.join(args)}, {lengths}, {act!r}, {callee(grouped)})"


RENDERERS["elided"] = _render_elided
RENDERERS[EXPERTS] = _render_experts

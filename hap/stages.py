"""Pipeline stages: the captured graph cut at block boundaries into graphs of their own.

A cut sits at the first op of a block (``Graph.blocks``) other than the first; stage ``s`` holds
the ops from its cut to the next one, the first stage also the prologue (embeddings), the last
the epilogue (head and loss). Every stage is again "a scalar loss computed from parameters,
buffers and batch inputs", so the planner, emitter and runtime handle it unchanged.

What a stage reads from an earlier stage crosses the cut, in one of two ways:

- an activation (a float tensor that needs a gradient, with one row per sample in dim 0, made by
  the stage just before) is sent forward and received as a new batch input; its gradient comes
  back as one more batch input ``grad_<name>`` of the sending stage, whose loss is the surrogate
  ``sum(y * grad_y)`` over what it sends: its backward gives every parameter exactly the
  vector-Jacobian product of the later stages' loss, so the stages together compute the
  gradient of the whole graph;
- a value without a gradient (rotary cos/sin, an attention mask, an arange) is recomputed: its
  producer ops, and theirs up to parameters, buffers and batch inputs, are copied in front of
  the reading stage's ops under the same names. Sending it would cost bandwidth and an extra
  ordering between the stages for a value that is cheap to make again.

Anything else crossing (an activation read two stages later, a list, a tensor with a gradient
but no per-sample dim 0, a random or in-place value) has no exact pipelined form here and
raises ``InfeasiblePlan`` naming it and its source. Parameters and buffers sit in every stage
that reads them; a tied weight read by two stages (an embedding shared with the head) is in
both, and ``shared_params`` says where, for the caller to sum their gradients.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from hap.errors import InfeasiblePlan
from hap.graph import DTYPE_BYTES, Graph, Node, TensorMeta

SOURCE = "hap pipeline cut"
# ops whose value differs on every call (as hap.emit.RANDOM_OPS): recomputing one in another
# stage would not give the value the original program used
RANDOM_OPS = {"dropout", "native_dropout", "rand_like", "randn_like", "randint_like", "bernoulli", "rand", "randn",
              "randint", "randperm", "normal", "uniform", "multinomial", "feature_dropout", "alpha_dropout"}
FIX = "choose other cuts (hap.stages.cut_candidates lists them), or fewer stages"


@dataclass
class StageGraph:
    graph: Graph
    index: int
    inputs: tuple[int, ...]  # the original batch inputs it reads (their indices in the batch)
    receives: tuple[str, ...]  # activations received from stage index - 1 (batch inputs after ``inputs``)
    sends: tuple[str, ...]  # activations sent to stage index + 1
    grads: tuple[str, ...]  # the batch inputs receiving the gradients of ``sends``, aligned with them
    blocks: tuple[str, ...]  # the block labels (``Graph.blocks``) whose ops it holds


@dataclass
class _Cut:
    """Where every op goes: each stage's own ops, what it sends and receives, what it recomputes."""
    own: list[list[str]]
    sends: list[list[str]]
    recompute: list[set[str]]


def cut_candidates(graph: Graph) -> list[int]:
    """Positions in ``graph.nodes`` where a stage may start: the first op of every block but the
    first (continuation runs ``x#2`` excluded), ascending."""
    pos = {n.name: i for i, n in enumerate(graph.nodes)}
    labels = [b for b in graph.blocks() if "#" not in b]
    return sorted({pos[graph.blocks()[b][0]] for b in labels[1:]})


def _where(graph: Graph, name: str) -> str:
    n = graph[name]
    return f"{name} ({n.source or n.module or n.target})"


def _is_random(node: Node) -> bool:
    return node.target.startswith("aten.") and node.target.split(".")[1].rstrip("_") in RANDOM_OPS


def _is_inplace(node: Node) -> bool:
    op = node.target.split(".")[1] if node.target.startswith("aten.") else ""
    return op.endswith("_") and not op.endswith("__")  # add_ mutates, __and__ does not


def _analyse(graph: Graph, cuts: Sequence[int]) -> _Cut:
    cuts = list(cuts)
    candidates = cut_candidates(graph)
    if cuts != sorted(set(cuts)) or not set(cuts) <= set(candidates):
        raise InfeasiblePlan(f"cuts {cuts} of {graph.model_name or 'the model'} are not an ascending subset of "
                             f"its block boundaries {candidates} (node positions; hap.stages.cut_candidates)")
    bounds = [0, *cuts, len(graph.nodes)]
    stage_of: dict[str, int] = {}
    own: list[list[str]] = [[] for _ in range(len(bounds) - 1)]
    for s in range(len(own)):
        for n in graph.nodes[bounds[s]:bounds[s + 1]]:
            if n.kind == "op":
                stage_of[n.name] = s
                own[s].append(n.name)
    last = len(own) - 1
    if stage_of.get(graph.loss, last) != last:
        raise InfeasiblePlan(f"the loss {_where(graph, graph.loss)} is computed in stage {stage_of[graph.loss]}, "
                             f"before the last cut; {FIX}")
    grad = graph.requires_grad()
    sends: list[dict[str, None]] = [{} for _ in own]
    recompute: list[set[str]] = [set() for _ in own]

    def refuse(name: str, s: int, why: str) -> InfeasiblePlan:
        return InfeasiblePlan(f"stage {s} of {graph.model_name or 'the model'} reads {_where(graph, name)}, made in "
                              f"stage {stage_of[name]}: {why}; {FIX}")

    def ancestors(name: str, s: int, out: set[str]) -> None:
        """``name`` and the ops it comes from, all without a gradient, into ``out``."""
        stack = [name]
        while stack:
            i = stack.pop()
            if i in out or graph[i].kind != "op":
                continue
            node = graph[i]
            if i in grad:
                raise refuse(name, s, f"it has no gradient but is computed from {_where(graph, i)}, which has one, "
                                      "so it can neither be recomputed alone nor sent as an activation")
            if _is_random(node) or _is_inplace(node):
                raise refuse(name, s, f"it comes from {_where(graph, i)}, "
                                      f"{'a random' if _is_random(node) else 'an in-place'} op that recomputing "
                                      "would not repeat exactly")
            out.add(i)
            stack.extend(node.inputs())

    for s, names in enumerate(own):
        for name in names:
            for i in graph[name].inputs():
                t = stage_of.get(i, s)  # placeholders are placed, not crossed
                if t == s:
                    continue
                if i not in grad:
                    ancestors(i, s, recompute[s])
                    continue
                node = graph[i]
                if not isinstance(node.meta, TensorMeta):
                    raise refuse(i, s, "a list of tensors with a gradient cannot be sent between stages")
                if not node.meta.is_float:
                    raise refuse(i, s, f"a {node.meta.dtype} tensor with a gradient cannot be sent between stages")
                if not node.batch_dims or list(node.batch_dims[0]) != [1, 0]:
                    dims = (f"its dim 0 has size {node.batch_dims[0][0]}*B+{node.batch_dims[0][1]}"
                            if node.batch_dims else "the graph does not say which dims follow the batch "
                            "(it did not capture at twice the batch)")
                    raise refuse(i, s, "an activation with a gradient is sent only with one row per sample in dim 0 "
                                       f"(micro-batches split it), and {dims}")
                if t != s - 1:
                    raise refuse(i, s, f"an activation is sent only to the next stage, and this one skips "
                                       f"stage{'s' if s - t > 2 else ''} {', '.join(map(str, range(t + 1, s)))}")
                sends[t][i] = None
    for s in range(last):
        if not sends[s]:
            raise InfeasiblePlan(f"stage {s} of {graph.model_name or 'the model'} sends no activation with a gradient "
                                 f"to stage {s + 1}, so its parameters do not reach the loss through it; {FIX}")
    order = {n.name: k for k, n in enumerate(graph.nodes)}
    return _Cut(own, [sorted(d, key=order.__getitem__) for d in sends], recompute)


def crossing(graph: Graph, cuts: Sequence[int]) -> list[float]:
    """Per cut: the bytes per sample of the activations sent across it (each also comes back as
    a gradient of the same size). Raises InfeasiblePlan as ``split`` does."""
    plan = _analyse(graph, cuts)
    per = graph.batch_size or graph.global_batch() or 1
    return [sum(graph[y].out.nbytes for y in plan.sends[s]) / per for s in range(len(cuts))]


def _unique(taken: set[str], name: str) -> str:
    out, k = name, 1
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    taken.add(out)
    return out


def _surrogate(graph: Graph, sends: Sequence[str], grads: Sequence[str], taken: set[str]) -> tuple[list[Node], str]:
    """``sum(y * grad_y)`` over the sent activations: nodes and the loss name."""
    nodes: list[Node] = []
    total: str | None = None
    dtypes = {graph[y].out.dtype for y in sends}
    loss_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    scalar = DTYPE_BYTES.get(loss_dtype, 4)
    for y, g in zip(sends, grads):
        m = graph[y].out
        mul = Node(_unique(taken, f"vjp_{y}"), "op", "aten.mul.Tensor", [{"node": y}, {"node": g}],
                   meta=TensorMeta(m.shape, m.dtype), op_class="pointwise", flops=float(m.numel),
                   bytes=3.0 * m.nbytes, source=SOURCE, batch_dims=copy.deepcopy(graph[y].batch_dims))
        part = Node(_unique(taken, f"vjp_sum_{y}"), "op", "aten.sum.default", [{"node": mul.name}],
                    meta=TensorMeta((), m.dtype), op_class="reduction", flops=float(m.numel),
                    bytes=float(m.nbytes + DTYPE_BYTES.get(m.dtype, 4)), source=SOURCE, batch_dims=[])
        nodes += [mul, part]
        if total is None:
            total = part.name
            continue
        add = Node(_unique(taken, "vjp_loss"), "op", "aten.add.Tensor", [{"node": total}, {"node": part.name}],
                   meta=TensorMeta((), loss_dtype), op_class="pointwise", flops=1.0, bytes=3.0 * scalar,
                   source=SOURCE, batch_dims=[])
        nodes.append(add)
        total = add.name
    assert total is not None
    return nodes, total


def _stage(graph: Graph, plan: _Cut, s: int, block_of: dict[str, str]) -> StageGraph:
    last = s == len(plan.own) - 1
    receives = plan.sends[s - 1] if s else []
    sends = [] if last else plan.sends[s]
    extra = plan.recompute[s]
    ops = [n for n in graph.nodes if n.name in extra] + [graph[n] for n in plan.own[s]]
    read = {i for n in ops for i in n.inputs()}
    placed = [copy.deepcopy(n) for n in graph.nodes if n.kind in ("param", "buffer") and n.name in read]
    originals = [(k, n) for k, n in enumerate(n for n in graph.nodes if n.kind == "input")]
    inputs = [(k, n) for k, n in originals if n.name in read]
    taken = {n.name for n in graph.nodes}
    grads = [_unique(taken, f"grad_{y}") for y in sends]
    batch: list[Node] = []
    for _, n in inputs:
        batch.append(Node(n.name, "input", "", meta=n.meta, source="", batch_dims=copy.deepcopy(n.batch_dims),
                          batch_args=copy.deepcopy(n.batch_args)))
    for y in receives:
        p = graph[y]
        batch.append(Node(y, "input", "", meta=p.meta, source=f"{SOURCE}: received from stage {s - 1}",
                          batch_dims=copy.deepcopy(p.batch_dims)))
    for y, g in zip(sends, grads):
        p = graph[y]
        batch.append(Node(g, "input", "", meta=p.meta, source=f"{SOURCE}: gradient of {y} from stage {s + 1}",
                          batch_dims=copy.deepcopy(p.batch_dims)))
    for pos, n in enumerate(batch):
        n.target = str(pos)
        n.source = n.source or f"batch[{pos}]"
    nodes = placed + batch + [copy.deepcopy(n) for n in ops]
    loss = graph.loss
    if not last:
        tail, loss = _surrogate(graph, sends, grads, taken)
        nodes += tail
    experts = {path: copy.deepcopy(e) for path, e in graph.experts.items()
               if any(n.token_wise == path for n in ops)}
    g = Graph(nodes, loss, len(batch), f"{graph.model_name} stage {s}", graph.precision, graph.grad_reduce,
              graph.batch_size, experts, tuple(receives))
    g.lint()
    labels = tuple(dict.fromkeys(block_of[n] for n in plan.own[s] if n in block_of))
    return StageGraph(g, s, tuple(k for k, _ in inputs), tuple(receives), tuple(sends), tuple(grads), labels)


def split(graph: Graph, cuts: Sequence[int]) -> list[StageGraph]:
    """The stages of ``graph`` cut before the nodes at positions ``cuts`` (an ascending subset
    of ``cut_candidates``); ``[]`` gives one stage, the whole graph. Raises InfeasiblePlan when
    something crosses a cut that cannot (see the module docstring)."""
    if not cuts:
        whole = Graph([copy.deepcopy(n) for n in graph.nodes], graph.loss, graph.num_inputs, graph.model_name,
                      graph.precision, graph.grad_reduce, graph.batch_size, copy.deepcopy(graph.experts))
        return [StageGraph(whole, 0, tuple(range(graph.num_inputs)), (), (), (), tuple(graph.blocks()))]
    plan = _analyse(graph, cuts)
    block_of = graph.block_of()
    return [_stage(graph, plan, s, block_of) for s in range(len(plan.own))]


def shared_weights(graphs: Sequence[Graph]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The parameters more than one stage's graph holds, one entry per tensor (its state-dict
    keys: a tied embedding and head is one) -> the indices of those graphs: their gradients are
    the sum of the stages' gradients."""
    where: dict[tuple[str, ...], list[int]] = {}
    for i, g in enumerate(graphs):
        for n in g.params():
            stages = where.setdefault(tuple(n.aliases or [n.target]), [])
            if i not in stages:
                stages.append(i)
    return {k: tuple(v) for k, v in where.items() if len(v) > 1}


def shared_in(graph: Graph, keys: set[str]) -> set[str]:
    """The names of ``graph``'s parameters known by any of the state-dict keys ``keys`` (the
    shared weights of ``shared_params``, in one stage's graph)."""
    return {n.name for n in graph.params() if set(n.aliases or [n.target]) & keys}


def shared_params(stages: Sequence[StageGraph]) -> dict[str, tuple[int, ...]]:
    """``shared_weights`` by state-dict key: each key of a parameter held by more than one stage
    -> those stages."""
    return {key: where for keys, where in shared_weights([st.graph for st in stages]).items() for key in keys}

"""Baseline strategies on the same cost model: each is the MILP with some placements pinned.

    dp_even           data parallel, even batch shares: parameters replicated, batch sharded
    dp_proportional   data parallel, batch shares proportional to device speed
    fsdp_even         fully sharded data parallel, even shares: every parameter (and with it
                      its gradient and optimizer state) sharded on dim 0, all-gathered before
                      use (its reduce-scatter is the backward); the batch sharded
    megatron_tp_even  tensor (Megatron) parallel, even shares: every weight matrix sharded on
                      dim 0 or 1 (column / row parallel, the solve picks), the batch replicated

Every function returns a full ``Plan`` (``strategy`` names the baseline), scored by
``hap.solve.evaluate`` like the plans ``hap.search`` returns, so it can be
simulated, drawn as a timeline and emitted. ``megatron_tp_even`` returns None where the
model has no weight matrix to shard.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from hap.calibrate import measured
from hap.cluster import Cluster
from hap.cost import CostModel
from hap.graph import Graph, Node, TensorMeta
from hap.placement import Splitter
from hap.plan import Plan, assemble_plan
from hap.rules import Candidate, RuleContext, view_units
from hap.solve import (
    all_candidates,
    evaluate,
    even_shares,
    solve_placements,
    speed_shares,
)

Pin = Callable[[Node, Candidate], bool]
BASELINES = ("dp_even", "dp_proportional", "fsdp_even", "megatron_tp_even")


def _global_batch(graph: Graph, n: int) -> int:
    inputs = [x for x in graph if x.kind == "input"]
    return inputs[0].meta.shape[0] if inputs and isinstance(inputs[0].meta, TensorMeta) and inputs[0].meta.shape \
        else n


def _shardable_input(node: Node, c: Candidate, cands: list[Candidate]) -> bool:
    return c.output.kind == "S" or len(cands) == 1


def solve_pinned(graph: Graph, cluster: Cluster, shares: tuple[int, ...], pin: Pin | None, strategy: str, *,
                 optimizer: str = "sgd", time_limit_s: float = 20.0, spec: str | None = None) -> Plan:
    """The MILP with ``shares`` fixed and ``pin`` restricting candidates, as a Plan."""
    t0 = time.perf_counter()
    cluster = measured(cluster)  # device "cpu": this machine, measured on first use
    ctx = RuleContext(graph, Splitter(shares), view_units(graph))
    cands = all_candidates(graph, ctx)
    cm = CostModel(graph, cluster, Splitter(shares), optimizer)
    wrapped = None if pin is None else (lambda node, c: pin(node, c, cands[node.name]))
    res = solve_placements(graph, cm, cands, pin=wrapped, time_limit_s=time_limit_s)
    ev = evaluate(graph, cm, res.choice)
    return assemble_plan(graph, cluster, shares, res.choice, ev, res.status, strategy=strategy, optimizer=optimizer,
                     spec=spec, solve_s=time.perf_counter() - t0)


def dp_pin(node: Node, c: Candidate, cands: list[Candidate]) -> bool:
    if node.kind == "param":
        return c.output.kind == "R"
    if node.kind == "input":
        return _shardable_input(node, c, cands)
    return True


def fsdp_pin(node: Node, c: Candidate, cands: list[Candidate]) -> bool:
    if node.kind == "param":
        # sharded on dim 0 where the rules allow it (unit 1 first), else replicated
        dim0 = [x for x in cands if x.output.kind == "S" and x.output.dim == 0]
        if not dim0:
            return c.output.kind == "R"
        best = min(dim0, key=lambda x: x.output.unit)
        return c.output == best.output
    if node.kind == "input":
        return _shardable_input(node, c, cands)
    return True


def megatron_pin(node: Node, c: Candidate, cands: list[Candidate]) -> bool:
    if node.kind == "param":
        m = node.meta
        if isinstance(m, TensorMeta) and m.ndim >= 2 and any(x.output.kind == "S" and x.output.dim in (0, 1)
                                                             for x in cands):
            return c.output.kind == "S" and c.output.dim in (0, 1)
        return True
    if node.kind == "input":
        return c.output.kind == "R"
    return True


# each baseline once: (how its shares are set, which placements it pins). The search
# (hap.search) solves the data-parallel ones with the same definitions.
SETUPS: dict[str, tuple[str, Callable[[Node, Candidate, list[Candidate]], bool]]] = {
    "dp_even": ("even", dp_pin),
    "dp_proportional": ("speed", dp_pin),
    "fsdp_even": ("even", fsdp_pin),
    "megatron_tp_even": ("even", megatron_pin),
}


def baseline_setup(name: str, cluster: Cluster, total: int) -> tuple[tuple[int, ...], Pin]:
    """The shares and the pin of baseline ``name`` for a global batch of ``total``."""
    how, pin = SETUPS[name]
    shares = even_shares(cluster.num_ranks, total) if how == "even" else speed_shares(cluster, total)
    return shares, pin


def _solve_baseline(name: str, graph: Graph, cluster: Cluster, **kw) -> Plan:
    shares, pin = baseline_setup(name, cluster, _global_batch(graph, cluster.num_ranks))
    return solve_pinned(graph, cluster, shares, pin, name, **kw)


def dp_even(graph: Graph, cluster: Cluster, **kw) -> Plan:
    return _solve_baseline("dp_even", graph, cluster, **kw)


def dp_proportional(graph: Graph, cluster: Cluster, **kw) -> Plan:
    return _solve_baseline("dp_proportional", graph, cluster, **kw)


def fsdp_even(graph: Graph, cluster: Cluster, **kw) -> Plan:
    return _solve_baseline("fsdp_even", graph, cluster, **kw)


def megatron_tp_even(graph: Graph, cluster: Cluster, **kw) -> Plan | None:
    matrices = [p for p in graph.params() if isinstance(p.meta, TensorMeta) and p.meta.ndim >= 2]
    if cluster.num_ranks < 2 or not matrices:
        return None
    return _solve_baseline("megatron_tp_even", graph, cluster, **kw)


def baseline(name: str, graph: Graph, cluster: Cluster, **kw) -> Plan | None:
    """A baseline by name (one of ``BASELINES``)."""
    fns = {"dp_even": dp_even, "dp_proportional": dp_proportional, "fsdp_even": fsdp_even,
           "megatron_tp_even": megatron_tp_even}
    if name not in fns:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return fns[name](graph, cluster, **kw)

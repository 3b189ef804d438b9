"""Baseline strategies on the same cost model: each is the MILP with some placements pinned.

    dp_even           data parallel, even batch shares: parameters replicated, batch sharded
    dp_proportional   data parallel, batch shares proportional to device speed
    fsdp_even         fully sharded data parallel, even shares: every parameter (and with it
                      its gradient and optimizer state) sharded on dim 0, all-gathered before
                      use (its reduce-scatter is the backward); the batch sharded
    fsdp_cephalo      Cephalo's plan for mixed GPUs (ICS '25): fsdp_even's placements with batch
                      shares proportional to device speed, state sharded in the same uneven
                      lengths, and per-rank micro-batches where activations overfill a rank
    megatron_tp_even  tensor (Megatron) parallel, even shares: every weight matrix sharded on
                      dim 0 or 1 (column / row parallel, the solve picks), the batch replicated

Every function returns a full ``Plan`` (``strategy`` names the baseline), solved as an
attempt of the search (``hap.search.Search.solved``: where activations overfill a rank, in
micro-batches or with blocks recomputed) and scored by ``hap.solve.evaluate`` like the plans
``hap.search`` returns, so it can be simulated, drawn as a timeline and emitted.
``megatron_tp_even`` returns None where the model has no weight matrix to shard.
"""
from __future__ import annotations

import dataclasses
import time

from hap.calibrate import resolve
from hap.cluster import Cluster
from hap.errors import InfeasiblePlan
from hap.graph import Graph, Node, TensorMeta
from hap.plan import BaselineResult, Plan
from hap.rules import Candidate
from hap.search import DATA_PARALLEL, Attempt, Pin, Search, assemble_plan, batch_sharded, global_batch, shares_by

BASELINES = ("dp_even", "dp_proportional", "fsdp_even", "fsdp_cephalo", "megatron_tp_even")
COMPARED = ("fsdp_even", "fsdp_cephalo", "megatron_tp_even")  # what hap-plan --compare adds to the search's


def solve_pinned(graph: Graph, cluster: Cluster, shares: tuple[int, ...], pin: Pin | None, strategy: str, *,
                 optimizer: str = "sgd", time_limit_s: float = 20.0, spec: str | None = None) -> Plan:
    """The MILP with ``shares`` fixed and ``pin`` restricting candidates, as a Plan: an attempt
    of the search (``hap.search.Search.solved``), memory levers included."""
    t0 = time.perf_counter()
    cluster = resolve(cluster)  # device "cpu": this machine's profile
    s = Search(graph, cluster, optimizer=optimizer, strict=False, time_limit_s=time_limit_s, user_pins={})
    attempt = Attempt(strategy, tuple(shares), pin, per_rank_recompute=False)
    try:
        won = s.solved(attempt)
    except InfeasiblePlan as e:
        raise s.explain(attempt) from e
    return assemble_plan(graph, cluster, won, strategy=strategy, spec=spec, solve_s=time.perf_counter() - t0)


def fsdp_pin(node: Node, c: Candidate, cands: list[Candidate]) -> bool:
    if node.kind == "param":
        # sharded on dim 0 where the rules allow it (unit 1 first), else replicated
        dim0 = [x for x in cands if x.output.kind == "S" and x.output.dim == 0]
        if not dim0:
            return c.output.kind == "R"
        best = min(dim0, key=lambda x: x.output.unit)
        return c.output == best.output
    if node.kind == "input":
        return batch_sharded(node, c, cands)
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


# each baseline once: (how its shares are set, which placements it pins); the data-parallel
# ones are the search's own (hap.search.DATA_PARALLEL)
SETUPS: dict[str, tuple[str, Pin]] = {
    **DATA_PARALLEL,
    "fsdp_even": ("even", fsdp_pin),
    "fsdp_cephalo": ("speed", fsdp_pin),
    "megatron_tp_even": ("even", megatron_pin),
}


def baseline_setup(name: str, cluster: Cluster, total: int, precision: str = "fp32") -> tuple[tuple[int, ...], Pin]:
    """The shares and the pin of baseline ``name`` for a global batch of ``total`` in ``precision``."""
    how, pin = SETUPS[name]
    return shares_by(how, cluster, total, precision), pin


def _solve_baseline(name: str, graph: Graph, cluster: Cluster, **kw) -> Plan:
    shares, pin = baseline_setup(name, cluster, global_batch(graph, cluster.num_ranks), graph.precision)
    return solve_pinned(graph, cluster, shares, pin, name, **kw)


def dp_even(graph: Graph, cluster: Cluster, **kw) -> Plan:
    return _solve_baseline("dp_even", graph, cluster, **kw)


def dp_proportional(graph: Graph, cluster: Cluster, **kw) -> Plan:
    return _solve_baseline("dp_proportional", graph, cluster, **kw)


def fsdp_even(graph: Graph, cluster: Cluster, **kw) -> Plan:
    return _solve_baseline("fsdp_even", graph, cluster, **kw)


def fsdp_cephalo(graph: Graph, cluster: Cluster, **kw) -> Plan:
    return _solve_baseline("fsdp_cephalo", graph, cluster, **kw)


def megatron_tp_even(graph: Graph, cluster: Cluster, **kw) -> Plan | None:
    matrices = [p for p in graph.params() if isinstance(p.meta, TensorMeta) and p.meta.ndim >= 2]
    if cluster.num_ranks < 2 or not matrices:
        return None
    return _solve_baseline("megatron_tp_even", graph, cluster, **kw)


def baseline(name: str, graph: Graph, cluster: Cluster, **kw) -> Plan | None:
    """A baseline by name (one of ``BASELINES``)."""
    fns = {"dp_even": dp_even, "dp_proportional": dp_proportional, "fsdp_even": fsdp_even,
           "fsdp_cephalo": fsdp_cephalo, "megatron_tp_even": megatron_tp_even}
    if name not in fns:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return fns[name](graph, cluster, **kw)


def compare(plan: Plan, cluster: Cluster, **kw) -> Plan:
    """``plan`` with the ``COMPARED`` baselines beside the search's: one that does not fit memory
    is reported as such (``predicted_step_s`` None, with the reason). Where a baseline predicts a
    faster step than ``plan``, that baseline is the plan (hap never prints a plan slower than a
    baseline it shows), with a note that says so."""
    more: dict[str, BaselineResult] = {}
    faster: tuple[str, Plan] | None = None
    for name in COMPARED:
        try:
            b = baseline(name, plan.graph, cluster, **kw)
        except InfeasiblePlan as e:
            more[name] = BaselineResult(None, reason=str(e))
            continue
        if b is None:
            continue
        more[name] = BaselineResult(b.predicted_step_s, b.shares, b.predicted.exposed_comm_s)
        if b.predicted_step_s < plan.predicted_step_s and (faster is None or b.predicted_step_s <
                                                           faster[1].predicted_step_s):
            faster = (name, b)
    baselines = {**plan.baselines, **more}
    if faster is None:
        return dataclasses.replace(plan, baselines=baselines)
    name, b = faster
    note = (f"the {name} baseline predicts {b.predicted_step_s * 1e3:.1f} ms, faster than the search's "
            f"{plan.predicted_step_s * 1e3:.1f} ms: the plan is {name}")
    return dataclasses.replace(b, baselines={**baselines, "hap_search": BaselineResult(
        plan.predicted_step_s, plan.shares, plan.predicted.exposed_comm_s)}, spec=plan.spec,
        warnings=plan.warnings, notes=plan.notes[:1] + (note,) + b.notes, solve_s=plan.solve_s + b.solve_s)

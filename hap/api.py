"""``hap.synthesize``: capture → search (cost, solve) → a Plan."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch

from hap.capture import capture
from hap.cluster import Cluster, load_cluster
from hap.errors import HapError, InfeasiblePlan, PinError
from hap.graph import Graph
from hap.placement import parse
from hap.plan import Plan
from hap.search import search

PIPELINE_WHEN = 0.25  # "auto" tries pipeline stages where exposed communication is at least this share of the step
MAX_AUTO_STAGES = 4  # and at most this many stages (each count solves every stage's plan)


def synthesize(model: torch.nn.Module, example_batch: Sequence[torch.Tensor], cluster: str | Cluster | None = None,
               *, optimizer: str = "sgd", precision: str = "fp32", strict: bool = False, time_limit_s: float = 20.0,
               spec: str | None = None, recompute: str = "auto", stages: int | str = "auto",
               progress: Callable[[str], None] | None = None) -> Plan:
    """Plan ``model`` (whose ``forward(*example_batch)`` returns the loss) for ``cluster``.

    ``cluster`` is a cluster TOML path, a loaded ``Cluster`` or None for the embedded default.
    The global batch is dim 0 of the example batch. ``precision`` is fp32 (the default: the
    program trains exactly what fp32 trains), bf16, fp16 (autocast; fp16 with loss scaling)
    or auto (``hap.precision.choose``). Where activations overfill a device the plan runs shares
    in micro-batches or recomputes blocks in backward; ``recompute`` ("auto", "all", "none")
    overrides the latter. ``stages``: pipeline stages, "auto" or a count (``plan_graph``).
    """
    say = progress or (lambda msg: None)
    say("capturing the model with torch.export")
    graph = capture(model, example_batch)
    cl = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    return plan_graph(graph, cl, optimizer=optimizer, precision=precision, strict=strict, time_limit_s=time_limit_s,
                      spec=spec, recompute=recompute, stages=stages, progress=say)


def plan_spec(spec: str, cluster: str | Cluster | None = None, *, batch_size: int | None = None, **kw) -> Plan:
    """Plan the model of a spec file (``model()``, ``batch()``, ``BATCH_SIZE``) for ``cluster``."""
    from pathlib import Path

    from hap.spec import capture_spec, load_spec

    graph = capture_spec(load_spec(spec), batch_size)
    cl = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    return plan_graph(graph, cl, spec=str(Path(spec).resolve()), **kw)


def plan_graph(graph: Graph, cluster: Cluster, *, optimizer: str = "sgd", strict: bool = False,
               time_limit_s: float = 20.0, spec: str | None = None, pins: dict[str, str] | None = None,
               precision: str = "fp32", grad_reduce: str = "fp32", recompute: str = "auto",
               experts: str = "auto", stages: int | str = "auto",
               progress: Callable[[str], None] | None = None) -> Plan:
    """Solve ``graph`` for ``cluster`` (``hap.search``). ``pins`` fixes the output placement of
    named nodes (``{"p_fc_weight": "S(0)"}``: a parameter sharded on dim 0), as a user constraint.
    ``recompute``: activation checkpointing of repeated blocks, "auto" (where memory is tight),
    "all" or "none". ``experts``: the experts of mixture-of-experts layers, "auto" (sharded where
    faster), "shard" (expert parallelism) or "whole" (on every rank, run on its own tokens).
    ``stages``: pipeline stages (``hap.pipeline``), "auto" (tried where the network binds: on
    several nodes, where communication is at least ``PIPELINE_WHEN`` of the step) or a count (1: none)."""
    pins = check_pins(pins or {})
    plan = search(graph, cluster, optimizer=optimizer, strict=strict, time_limit_s=time_limit_s, spec=spec,
                  pins=pins, precision=precision, grad_reduce=grad_reduce, recompute=recompute, experts=experts,
                  progress=progress)
    count = check_stages(stages)
    # a user's pins name nodes of the whole graph: "auto" keeps them on one stage
    if count != 1 and (count is not None or (not pins and pipeline_may_pay(plan))):
        if pins:
            raise PinError("--pin names nodes of the whole graph, which pipeline stages cut apart; plan with "
                           "--stages 1 to pin nodes")
        precise = plan.precision  # the precision the single-stage search chose ("auto" resolved)

        def solve(g: Graph, cl: Cluster, stage_pins: dict) -> Plan:
            return search(g, cl, optimizer=optimizer, strict=strict, time_limit_s=time_limit_s, spec=spec,
                          pins=stage_pins, precision=precise, grad_reduce=grad_reduce, recompute=recompute,
                          experts=experts, progress=progress, precision_advice=False)

        plan = pipelined(plan, count, solve, progress or (lambda msg: None))
    plan = dataclasses.replace(plan, notes=plan.notes + tuple(table_notes(plan)))
    plan.lint()
    return plan


def check_stages(stages: int | str) -> int | None:
    """``stages`` as a count, None for "auto"; anything else is refused."""
    if stages == "auto":
        return None
    try:
        count = int(stages)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise HapError(f"--stages {stages}: give auto or a number of pipeline stages of at least 1")
    return count


def pipeline_may_pay(plan: Plan) -> bool:
    """Whether "auto" tries pipeline stages: on more than one node, where the single-stage plan's
    exposed communication takes at least ``PIPELINE_WHEN`` of its step (only then can a cut,
    which moves activations instead of gradients, save more than its bubble costs)."""
    p = plan.predicted
    return plan.cluster.num_nodes > 1 and p.exposed_comm_s >= PIPELINE_WHEN * p.step_s


def pipelined(single: Plan, count: int | None, solve, say) -> Plan:
    """The pipelined plan of ``count`` stages (None: every count up to the cluster's nodes, and the
    single stage, the fastest kept). The single-stage plan stays as the baseline ``hap_1_stage``.
    Stages cut the single-stage plan's graph (the training graph: cut tensors in the dtypes they
    train in) and use its cluster (this machine's profile resolved)."""
    from hap.pipeline import plan_pipeline
    from hap.plan import BaselineResult

    typed, cluster = single.graph, single.cluster
    counts = [count] if count is not None else list(range(2, min(cluster.num_nodes, MAX_AUTO_STAGES) + 1))
    best = None
    for k in counts:
        try:
            p = plan_pipeline(typed, cluster, k, solve, say)
        except InfeasiblePlan:  # a stage, or its schedule, does not fit: "auto" tries the other counts
            if count is not None:
                raise
            continue
        if p is None and count is not None:
            raise InfeasiblePlan(f"--stages {count}: the model has fewer blocks ({len(typed.blocks())}) or the "
                                 f"cluster fewer ranks ({cluster.num_ranks}) than stages; plan fewer stages")
        if p is not None and (best is None or p.predicted_step_s < best.predicted_step_s):
            best = p
    if best is None or (count is None and best.predicted_step_s >= single.predicted_step_s):
        return single
    own = BaselineResult(single.predicted_step_s, single.shares, single.predicted.exposed_comm_s)
    # the precision's note holds for every stage; each stage's own notes say which stage
    precision = [n for n in single.notes if n.startswith(f"precision {single.precision}:")]
    staged = [f"stage {i}: {n}" for i, st in enumerate(best.stages) for n in st.plan.notes
              if not n.startswith("precision ")]
    # a node no stage reads (an unused buffer) keeps the single-stage plan's choice
    nodes = {name: best.nodes.get(name, single.nodes[name]) for name in single.nodes}
    return dataclasses.replace(best, graph=typed, nodes=nodes, baselines={**single.baselines, "hap_1_stage": own},
                               lower_bound_step_s=single.lower_bound_step_s, spec=single.spec,
                               notes=(*precision, *best.notes, *staged),
                               solve_s=single.solve_s + best.solve_s)


PIN_SYNTAX = ("a pin is NODE=PLACEMENT with PLACEMENT one of R (replicated), P (partial sums), S(d) (sharded on "
              "dim d) or S(d/u) (dim d cut in blocks of u elements), e.g. --pin p_fc_weight=S(0)")


def check_pins(pins: Mapping[str, str]) -> dict[str, str]:
    """``pins`` with names stripped and placements written as ``Placement`` writes them. A pin that
    is not NODE=PLACEMENT raises PinError before anything is solved; whether the node exists and
    its rules offer the placement is the search's to check (``hap.search.parse_pins``)."""
    out = {}
    for name, text in pins.items():
        shown = f"--pin {name}={text}"
        if not isinstance(name, str) or not name.strip():
            raise PinError(f"{shown}: no node name before '='; {PIN_SYNTAX}")
        try:
            p = parse(text) if isinstance(text, str) else None
        except ValueError:
            p = None
        if p is None or (p.is_shard and (p.dim < 0 or p.unit < 1)):
            raise PinError(f"{shown}: {text!r} is not a placement; {PIN_SYNTAX}")
        out[name.strip()] = str(p)
    return out


def table_notes(plan: Plan) -> list[str]:
    """Say how embedding tables were split and why (rows follow the plan's one ratio: speed)."""
    notes = []
    users = plan.graph.users()
    for p in plan.graph.params():
        if not any("embedding" in plan.graph[u].target for u in users[p.name]):
            continue
        out = plan.nodes[p.name].output
        name = p.target
        if out == "S(0)":
            from hap.placement import Splitter

            ls = Splitter(plan.shares).lengths(p.meta.shape[0])
            notes.append(f"embedding table {name} ({p.meta.shape[0]} rows) is sharded by rows, {ls} per rank: in "
                         "proportion to device speed (the plan's one ratio for compute and state), and every "
                         "rank's memory fits")
        elif out.startswith("S("):
            notes.append(f"embedding table {name} is sharded on its embedding dim ({out}) in proportion to speed: "
                         "the solver found that cheaper than sharding its rows")
        else:
            notes.append(f"embedding table {name} is replicated (cheaper than resharding its lookups here)")
    return notes

"""``hap.synthesize``: capture → cost → solve, returning a Plan."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import torch

from hap.baselines import baseline_setup, dp_pin
from hap.calibrate import measured
from hap.capture import capture
from hap.cluster import Cluster, load_cluster
from hap.cost import CostModel
from hap.errors import InfeasiblePlan
from hap.graph import Graph
from hap.placement import Splitter
from hap.plan import Plan, assemble_plan
from hap.rules import RuleContext, has_rule, view_units
from hap.solve import (
    Evaluation,
    all_candidates,
    evaluate,
    even_shares,
    memory_report,
    refit_shares,
    solve_placements,
    speed_shares,
)

log = logging.getLogger(__name__)


def synthesize(model: torch.nn.Module, example_batch: Sequence[torch.Tensor], cluster: str | Cluster | None = None,
               *, optimizer: str = "sgd", strict: bool = False, time_limit_s: float = 20.0, spec: str | None = None,
               progress: Callable[[str], None] | None = None) -> Plan:
    """Plan ``model`` (whose ``forward(*example_batch)`` returns the loss) for ``cluster``.

    ``cluster`` is a cluster TOML path, a loaded ``Cluster`` or None for the embedded default.
    The global batch is dim 0 of the example batch.
    """
    say = progress or (lambda msg: None)
    say("capturing the model with torch.export")
    graph = capture(model, example_batch)
    cl = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    return plan_graph(graph, cl, optimizer=optimizer, strict=strict, time_limit_s=time_limit_s, spec=spec,
                      progress=say)


def plan_spec(spec: str, cluster: str | Cluster | None = None, *, batch_size: int | None = None, **kw) -> Plan:
    """Plan the model of a spec file (``model()``, ``batch()``, ``BATCH_SIZE``) for ``cluster``."""
    from pathlib import Path

    from hap.spec import capture_spec, load_spec

    graph = capture_spec(load_spec(spec), batch_size)
    cl = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    return plan_graph(graph, cl, spec=str(Path(spec).resolve()), **kw)


def plan_graph(graph: Graph, cluster: Cluster, *, optimizer: str = "sgd", strict: bool = False,
               time_limit_s: float = 20.0, spec: str | None = None, pins: dict[str, str] | None = None,
               progress: Callable[[str], None] | None = None) -> Plan:
    """Solve ``graph`` for ``cluster``. ``pins`` fixes the output placement of named nodes
    (``{"p_fc_weight": "S(0)"}``: a parameter sharded on dim 0), as a user constraint."""
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    cluster = measured(cluster, say)  # device "cpu": this machine, measured on first use
    n = cluster.num_ranks
    inputs = [x for x in graph if x.kind == "input"]
    total = inputs[0].meta.shape[0] if inputs and inputs[0].meta.shape else n
    if total < 1:
        raise InfeasiblePlan("the global batch is empty; give batch() a batch_size of at least 1")
    warnings = [f"{x.target} has no sharding rule; it runs replicated ({x.source or x.name})"
                for x in graph.ops() if not has_rule(x.target)]
    for w in dict.fromkeys(warnings):
        log.warning(w)
    prop, even = speed_shares(cluster, total), even_shares(n, total)
    ctx = RuleContext(graph, Splitter(prop), view_units(graph))
    say(f"enumerating candidates for {len(graph)} nodes")
    cands = all_candidates(graph, ctx, strict=strict)
    user_pins = _parse_pins(graph, cands, pins or {})

    def user_pin(node, c, _own) -> bool:
        return node.name not in user_pins or c.output == user_pins[node.name]

    results: dict[str, tuple[tuple[int, ...], dict, Evaluation, str]] = {}

    infeasible: dict[str, str] = {}

    cands_by_shares = {prop: cands}

    def candidates_for(shares: tuple[int, ...]) -> dict:
        # which shardings are legal depends on the shares (no zero-length shard of a weight or
        # feature dim), so every share vector is solved over its own candidates: the ones that
        # emit finds again from the plan
        if shares not in cands_by_shares:
            cands_by_shares[shares] = all_candidates(graph, RuleContext(graph, Splitter(shares), ctx.units),
                                                     strict=strict)
        return cands_by_shares[shares]

    def run(tag: str, shares: tuple[int, ...], pin=None) -> tuple[dict, Evaluation, str] | None:
        cm = CostModel(graph, cluster, Splitter(shares), optimizer)
        own = candidates_for(shares)
        if pin is user_pin and any(not any(c.output == p for c in own[name]) for name, p in user_pins.items()):
            infeasible[tag] = "these shares leave a pinned placement without a legal candidate"
            return None  # e.g. a pinned weight shard that would be empty on a rank with a zero share
        restrict = None if pin is None else (lambda node, c: pin(node, c, own[node.name]))
        try:
            res = solve_placements(graph, cm, own, pin=restrict, time_limit_s=time_limit_s)
        except InfeasiblePlan as e:
            if tag != "hap":
                infeasible[tag] = str(e)
                return None
            raise _explain_memory(graph, cluster, cm, own, restrict, optimizer) from e
        ev = evaluate(graph, cm, res.choice)
        results[tag] = (shares, res.choice, ev, res.status)
        return res.choice, ev, res.status

    say("solving data-parallel baselines")
    for name in ("dp_even", "dp_proportional"):
        run(name, *baseline_setup(name, cluster, total))
    say("solving placements (MILP)")
    choice, ev, status = run("hap", prop, user_pin)
    shares = prop
    for it in range(3):
        cm = CostModel(graph, cluster, Splitter(shares), optimizer)
        new = refit_shares(graph, cm, choice, total)
        if new == shares:
            break
        say(f"re-fitting shares, round {it + 1}")
        again = run(f"hap_refit{it}", new, user_pin)
        if again is None or again[1].step_s >= ev.step_s * (1 - 1e-6):
            break
        shares, (choice, ev, status) = new, again
    if n > 1 and prop != even:
        run("hap_even", even, user_pin)
    if "dp_proportional" in results and not user_pins:  # data parallel with shares fitted to the timed work
        dp_cm = CostModel(graph, cluster, Splitter(prop), optimizer)
        dp_shares = refit_shares(graph, dp_cm, results["dp_proportional"][1], total)
        if dp_shares != prop:
            run("hap_dp_refit", dp_shares, dp_pin)
    # Prefer the simplest result (speed-proportional shares) unless another is at least
    # 1% faster; never one slower than a baseline.
    best_s = min(r[2].step_s for r in results.values())
    limit = min([best_s * 1.01] + [results[k][2].step_s for k in ("dp_even", "dp_proportional") if k in results])
    if user_pins:  # the user asked for this strategy: baselines are for comparison only
        limit = min(r[2].step_s for k, r in results.items() if k.startswith("hap")) * 1.01
    order = (["hap", "dp_proportional"] + [k for k in results if k.startswith("hap_refit")]
             + ["hap_dp_refit", "hap_even", "dp_even"])
    best_tag = next(k for k in order if k in results and results[k][2].step_s <= limit
                    and (not user_pins or k.startswith("hap")))
    shares, choice, ev, status = results[best_tag]
    strategy = "hap" if best_tag.startswith("hap") else best_tag
    baselines = {}
    for k in ("dp_even", "dp_proportional"):
        if k in results:
            baselines[k] = {"predicted_step_s": results[k][2].step_s, "shares": list(results[k][0]),
                            "comm_s": results[k][2].comm_s + results[k][2].grad_sync_s, "feasible": True}
        else:  # does not fit the devices' memory: no step time to compare
            baselines[k] = {"predicted_step_s": None, "feasible": False, "reason": infeasible.get(k, "")}
    idle = [r for r, x in enumerate(shares) if x == 0]
    if idle:
        warnings.append(f"{len(idle)} of {n} ranks get no samples of the global batch of {total} (ranks "
                        f"{idle[0]}..{idle[-1]}): they only take part in sharded layers; a global batch of at "
                        f"least {n} (--batch-size) gives every rank data")
    plan = assemble_plan(graph, cluster, shares, choice, ev, status, strategy=strategy, optimizer=optimizer,
                         spec=spec, solve_s=time.perf_counter() - t0, baselines=baselines,
                         warnings=list(dict.fromkeys(warnings)))
    plan = dataclasses.replace(plan, notes=table_notes(plan))
    plan.lint()
    return plan


def table_notes(plan: Plan) -> list[str]:
    """Say how embedding tables were split and why (rows follow the plan's one ratio: speed)."""
    notes = []
    users = plan.graph.users()
    for p in plan.graph.params():
        if not any("embedding" in plan.graph[u].target for u in users[p.name]):
            continue
        out = plan.nodes[p.name]["output"]
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


def _explain_memory(graph: Graph, cluster: Cluster, cm: CostModel, cands: dict, pin,
                    optimizer: str) -> InfeasiblePlan:
    """The least memory any assignment needs (each tensor sharded as far as its rules allow),
    and which rank it still overfills by how much, as an error with fixes."""
    choice = {}
    for node in graph:
        allowed = [c for c in cands[node.name] if pin is None or pin(node, c)] or cands[node.name]
        choice[node.name] = min(allowed, key=lambda c: max(cm.memory_bytes(node, c)))
    report = memory_report(graph, cm, choice)
    over = [(row["total"] - cluster.memory_bytes(r), r) for r, row in enumerate(report)]
    excess, r = max(over)
    if excess <= 0:
        return InfeasiblePlan("the solver found no plan that meets every constraint, though the memory would fit; "
                              "check the --pin placements you gave")
    row = report[r]
    gb = 1e9
    fixes = ["a smaller global batch (--batch-size)", "a cluster with more memory per device"]
    if optimizer != "sgd":
        fixes.insert(0, "--optimizer sgd (no optimizer state)")
    return InfeasiblePlan(
        f"no plan fits in memory: rank {r} ({cluster.ranks[r].device}) needs at least {row['total'] / gb:.1f} GB "
        f"(parameters {row['parameters'] / gb:.1f}, gradients {row['gradients'] / gb:.1f}, optimizer "
        f"{row['optimizer'] / gb:.1f}, activations {row['activations'] / gb:.1f}) even with every tensor sharded "
        f"as far as the rules allow, and has {cluster.memory_bytes(r) / gb:.1f} GB. Try: {'; '.join(fixes)}.")


def _parse_pins(graph: Graph, cands: dict, pins: dict[str, str]) -> dict:
    from hap.placement import parse

    out = {}
    for name, text in pins.items():
        if name not in graph:
            params = ", ".join(n.name for n in graph.params()[:6])
            raise InfeasiblePlan(f"--pin {name}={text}: no node named {name!r} (parameters are e.g. {params})")
        try:
            p = parse(text)
        except ValueError as e:
            raise InfeasiblePlan(f"--pin {name}={text}: {e}") from None
        offered = sorted({str(c.output) for c in cands[name]})
        if str(p) not in offered:
            raise InfeasiblePlan(f"--pin {name}={text}: {name} can only be placed as {', '.join(offered)}")
        out[name] = p
    return out

"""Op coverage of a plan: which captured ATen ops have sharding rules, and which ran
replicated in the chosen plan (``hap-plan SPEC --coverage``).

An op without a rule always runs replicated (every rank computes all of it); an op with
a rule may still run replicated when the solve found that cheapest (creation ops, tiny
tensors) — the report separates the two so a missing rule is easy to spot.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from rich.table import Table

from hap.rules import has_rule

if TYPE_CHECKING:
    from hap.plan import Plan


def ran_replicated(plan: Plan, name: str) -> bool:
    """Whether node ``name`` ran on every rank over whole tensors (its all-``R`` candidate)."""
    chosen = plan.nodes[name]
    return chosen.candidate.name == "R" and chosen.output == "R"


def coverage(plan: Plan) -> dict[str, Any]:
    """Per captured op target: count, whether a rule exists, how many of its nodes ran
    replicated, and the source of the first replicated one. Ops sorted by count, then name."""
    ops = [n for n in plan.graph if n.kind == "op"]
    counts = Counter(n.target for n in ops)
    replicated: Counter[str] = Counter()
    where: dict[str, str] = {}
    for n in ops:
        if ran_replicated(plan, n.name):
            replicated[n.target] += 1
            where.setdefault(n.target, n.source or n.name)
    rows = [{"op": t, "count": c, "has_rule": has_rule(t), "replicated": replicated[t],
             "replicated_source": where.get(t, "")}
            for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {
        "model": plan.graph.model_name,
        "nodes": len(ops),
        "op_types": len(counts),
        "with_rule": sum(c for t, c in counts.items() if has_rule(t)),
        "replicated": sum(replicated.values()),
        "no_rule": sorted(t for t in counts if not has_rule(t)),
        "ops": rows,
    }


def coverage_table(plan: Plan) -> Table:
    cov = coverage(plan)
    t = Table(title=f"op coverage of {cov['model']}: {cov['nodes']} ops of {cov['op_types']} kinds, "
                    f"{cov['with_rule']} with a sharding rule, {cov['replicated']} ran replicated")
    for col, just in (("op", "left"), ("count", "right"), ("rule", "left"), ("replicated", "right"),
                      ("first replicated at", "left")):
        t.add_column(col, justify=just)
    for row in cov["ops"]:
        rule = "yes" if row["has_rule"] else "[red]no[/]"
        rep = f"{row['replicated']}/{row['count']}"
        t.add_row(row["op"], str(row["count"]), rule, rep, " ".join(row["replicated_source"].split()))
    return t


__all__ = ["coverage", "coverage_table", "ran_replicated"]

"""The Plan: what the solve chose, what it predicts, and enough to emit the program.

A Plan is plain data (``to_json`` / ``from_json``): the captured graph, the cluster, the
integer batch share of every rank, the chosen candidate and placements of every node,
every resharding collective with its form, the predicted step-time breakdown and memory
per rank, the baselines and the lower bound on the same cost model, and the solver's
true status.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hap.errors import PlanFileError
from hap.graph import Graph
from hap.placement import Splitter

if TYPE_CHECKING:
    from hap.cluster import Cluster
    from hap.rules import Candidate
    from hap.solve import Evaluation


@dataclass(frozen=True)
class Plan:
    """Built once, by ``assemble_plan`` (or ``from_json``); a changed plan is a new one
    (``dataclasses.replace``)."""

    graph: Graph
    cluster: Cluster
    shares: tuple[int, ...]
    nodes: dict[str, dict[str, Any]]  # name -> {candidate, inputs, output, target, source, module}
    moves: list[dict[str, Any]]  # {producer, src, dst, kind, form, seconds}
    grad_synced: list[str]
    predicted: dict[str, Any]  # step_s, compute_s (per rank), critical_compute_s, comm_s, grad_sync_s, memory_bytes
    baselines: dict[str, dict[str, Any]]  # name -> {predicted_step_s, shares, ...}
    lower_bound_step_s: float
    solve_s: float
    solver_status: str
    optimizer: str = "sgd"
    strategy: str = "hap"  # which search result won: hap | dp_even | dp_proportional
    spec: str | None = None  # path of the model spec file (needed to emit)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why notable choices were made

    @property
    def num_ranks(self) -> int:
        return len(self.shares)

    @property
    def global_batch(self) -> int:
        return sum(self.shares)

    def choice(self) -> dict[str, Candidate]:
        """The candidate chosen for every node, as the plan carries it (no rules are run again)."""
        from hap.rules import Candidate

        try:
            return {name: Candidate.from_json(n) for name, n in self.nodes.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise PlanFileError(f"the plan's node choices are incomplete ({type(e).__name__}: {e}); re-plan with "
                                "this version of hap") from None

    @property
    def predicted_step_s(self) -> float:
        return float(self.predicted["step_s"])

    def digest(self) -> str:
        body = json.dumps({"nodes": self.nodes, "shares": self.shares}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    # ---- checks ------------------------------------------------------------------------
    def lint(self) -> None:
        """Raise PlanFileError where the plan contradicts itself."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise PlanFileError(f"plan of {self.graph.model_name or 'the model'}: {what}")

        need(len(self.shares) == self.cluster.num_ranks,
             f"{len(self.shares)} shares for {self.cluster.num_ranks} ranks; one share per rank")
        need(all(s >= 0 for s in self.shares), f"negative share in {self.shares}")
        first_input = next((n for n in self.graph if n.kind == "input"), None)
        if first_input is not None and first_input.meta.shape:
            need(sum(self.shares) == first_input.meta.shape[0],
                 f"shares {self.shares} sum to {sum(self.shares)}, not the global batch {first_input.meta.shape[0]}")
        missing = [n.name for n in self.graph if n.name not in self.nodes]
        need(not missing, f"nodes without a placement: {', '.join(missing[:5])}")
        need(self.lower_bound_step_s <= self.predicted_step_s * 1.0001,
             f"the lower bound {self.lower_bound_step_s} exceeds the predicted step {self.predicted_step_s}")

    # ---- JSON ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        ranks = []
        for r in range(self.num_ranks):
            info = self.cluster.ranks[r]
            ranks.append({
                "rank": r, "device": info.device, "node": info.node, "slowdown": info.slowdown,
                "batch_share": int(self.shares[r]),
                "compute_s": self.predicted["compute_s"][r],
                "memory_bytes": int(self.predicted["memory_bytes"][r]),
                "memory_capacity_bytes": int(self.cluster.memory_bytes(r)),
            })
        return {
            "format": "hap-plan/1",
            "model": self.graph.model_name,
            "spec": self.spec,
            "digest": self.digest(),
            "strategy": self.strategy,
            "global_batch": self.global_batch,
            "optimizer": self.optimizer,
            "ranks": ranks,
            "predicted_step_s": self.predicted_step_s,
            "predicted": self.predicted,
            "baselines": self.baselines,
            "lower_bound_step_s": self.lower_bound_step_s,
            "solve_s": self.solve_s,
            "solver_status": self.solver_status,
            "nodes": self.nodes,
            "moves": self.moves,
            "grad_synced": self.grad_synced,
            "warnings": self.warnings,
            "notes": self.notes,
            "cluster": self.cluster.to_json(),
            "graph": self.graph.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        """A plan from its JSON; a file that is not one raises PlanFileError saying what is wrong."""
        from hap.cluster import Cluster

        if not isinstance(d, dict) or d.get("format") not in (None, "hap-plan/1"):
            raise PlanFileError("not a hap plan (format hap-plan/1): re-plan with hap-plan --emit")
        try:
            plan = cls(
                graph=Graph.from_json(d["graph"]),
                cluster=Cluster.from_json(d["cluster"]),
                shares=tuple(int(r["batch_share"]) for r in d["ranks"]),
                nodes=d["nodes"], moves=d["moves"], grad_synced=d["grad_synced"], predicted=d["predicted"],
                baselines=d["baselines"], lower_bound_step_s=d["lower_bound_step_s"], solve_s=d["solve_s"],
                solver_status=d["solver_status"], optimizer=d.get("optimizer", "sgd"),
                strategy=d.get("strategy", "hap"), spec=d.get("spec"), warnings=d.get("warnings", []),
                notes=d.get("notes", []),
            )
        except KeyError as e:
            raise PlanFileError(f"the plan lacks {e.args[0]!r}; re-plan with this version of hap") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise PlanFileError(f"the plan is malformed ({type(e).__name__}: {e}); re-plan with this version of hap") \
                from None
        plan.lint()
        plan.choice()  # every node's candidate decodes
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(json.loads(Path(path).read_text()))

    # ---- people ------------------------------------------------------------------------
    def summary(self) -> str:
        from hap.report import plan_text

        return plan_text(self)

    def emit(self, out_dir: str | Path, spec: str | None = None, force: bool = False) -> Path:
        from hap.emit import emit_program

        return emit_program(self, Path(out_dir), spec=spec or self.spec, force=force)


def assemble_plan(graph: Graph, cluster: Cluster, shares: tuple[int, ...], choice: dict, ev: Evaluation,
                  status: str, *, strategy: str, optimizer: str = "sgd", spec: str | None = None,
                  solve_s: float = 0.0, baselines: dict | None = None, warnings: list[str] | None = None) -> Plan:
    """A Plan from a solved assignment and its evaluation (the search's and every baseline's)."""
    from hap.cost import CostModel
    from hap.solve import lower_bound_s

    cm = CostModel(graph, cluster, Splitter(shares), optimizer)
    nodes = {}
    for node in graph:
        c = choice[node.name]
        nodes[node.name] = {**c.to_json(), "target": node.target, "source": node.source, "module": node.module}
    moves = [{"producer": m.producer, "src": str(m.src), "dst": str(m.dst), "kind": m.conversion.kind,
              "form": m.conversion.form, "seconds": m.conversion.seconds} for m in ev.moves]
    predicted = {"step_s": ev.step_s, "compute_s": list(ev.compute_s), "critical_compute_s": ev.critical_compute_s,
                 "comm_s": ev.comm_s, "grad_sync_s": ev.grad_sync_s, "memory_bytes": list(ev.memory_bytes),
                 "grad_buckets": ev.grad_buckets, "grad_overlap": ev.grad_overlap}
    lb = lower_bound_s(graph, cm)
    return Plan(graph, cluster, tuple(shares), nodes, moves, ev.grad_synced, predicted, baselines or {}, lb,
                solve_s, status, optimizer, strategy, spec, warnings or [])

"""The Plan: what the solve chose, what it predicts, and enough to emit the program.

A Plan is plain data (``to_json`` / ``from_json``): the captured graph, the cluster, the
integer batch share of every rank, the chosen candidate and placements of every node,
every resharding collective with its form, the predicted step-time breakdown and memory
per rank, the baselines and the lower bound on the same cost model, and the solver's
true status.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hap.errors import HapError, PlanFileError
from hap.graph import Graph
from hap.rules import Candidate

if TYPE_CHECKING:
    from hap.cluster import Cluster


@dataclass(frozen=True)
class NodeChoice:
    """What the plan chose for one graph node: its candidate, and where the node came from."""

    candidate: Candidate
    target: str
    source: str = ""
    module: str = ""

    @property
    def output(self) -> str:
        return str(self.candidate.output)

    def to_json(self) -> dict[str, Any]:
        return {**self.candidate.to_json(), "target": self.target, "source": self.source, "module": self.module}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeChoice:
        return cls(Candidate.from_json(d), str(d["target"]), d.get("source") or "", d.get("module") or "")


@dataclass(frozen=True)
class PlannedMove:
    """One resharding collective the program runs: ``producer``'s output, from ``src`` to ``dst``."""

    producer: str
    src: str
    dst: str
    kind: str
    form: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlannedMove:
        return cls(str(d["producer"]), str(d["src"]), str(d["dst"]), str(d["kind"]), str(d.get("form") or ""),
                   float(d["seconds"]))


@dataclass(frozen=True)
class Prediction:
    """The cost model's account of one step: per-rank compute and memory, the exposed
    communication, and how gradients are bucketed for their reduction."""

    step_s: float
    compute_s: tuple[float, ...]
    critical_compute_s: float
    comm_s: float
    grad_sync_s: float
    memory_bytes: tuple[int, ...]
    grad_buckets: tuple[tuple[str, ...], ...] = ()
    grad_overlap: bool = False
    optimizer_s: float = 0.0  # the parts of critical_compute_s that are the optimizer step
    data_s: float = 0.0  # and reading the batch

    @property
    def exposed_comm_s(self) -> float:
        return self.comm_s + self.grad_sync_s

    def phases(self) -> dict[str, float]:
        """The step in the phases a training run logs (``phase_s`` in ``--log-json``; the
        runtime's ``hap.runtime.logger.PHASES``): forward and backward compute, their exposed
        collectives, the gradient all-reduce left after backward, the optimizer step, reading
        the batch; they sum to ``step_s``."""
        return {"compute": self.critical_compute_s - self.optimizer_s - self.data_s, "exposed_comm": self.comm_s,
                "grad_sync": self.grad_sync_s, "optimizer": self.optimizer_s, "data_wait": self.data_s, "other": 0.0}

    def to_json(self) -> dict[str, Any]:
        return {"step_s": self.step_s, "compute_s": list(self.compute_s),
                "critical_compute_s": self.critical_compute_s, "comm_s": self.comm_s,
                "grad_sync_s": self.grad_sync_s, "memory_bytes": [int(m) for m in self.memory_bytes],
                "grad_buckets": [list(b) for b in self.grad_buckets], "grad_overlap": self.grad_overlap,
                "optimizer_s": self.optimizer_s, "data_s": self.data_s, "phases_s": self.phases()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Prediction:
        return cls(float(d["step_s"]), tuple(float(x) for x in d["compute_s"]), float(d["critical_compute_s"]),
                   float(d["comm_s"]), float(d["grad_sync_s"]), tuple(int(x) for x in d["memory_bytes"]),
                   tuple(tuple(str(n) for n in b) for b in d.get("grad_buckets", [])),
                   bool(d.get("grad_overlap", False)), float(d.get("optimizer_s", 0.0)), float(d.get("data_s", 0.0)))


@dataclass(frozen=True)
class Stage:
    """One stage of a pipelined plan (``hap.pipeline``): a contiguous part of the captured graph
    (its blocks) on some of the cluster's ranks, with its own SPMD plan. ``plan``'s graph is the
    stage's (``hap.stages``), its cluster those ranks alone, numbered from 0; its shares split
    every micro-batch among them. ``inputs`` are the model's batch tensors it reads, ``receives``
    the activations the previous stage sends it, ``sends`` those it sends the next."""

    ranks: tuple[int, ...]
    blocks: tuple[str, ...]
    plan: Plan
    inputs: tuple[int, ...]
    receives: tuple[str, ...]
    sends: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"ranks": list(self.ranks), "blocks": list(self.blocks), "inputs": list(self.inputs),
                "receives": list(self.receives), "sends": list(self.sends), "plan": self.plan.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Stage:
        return cls(tuple(int(r) for r in d["ranks"]), tuple(str(b) for b in d["blocks"]), Plan.from_json(d["plan"]),
                   tuple(int(i) for i in d["inputs"]), tuple(str(x) for x in d["receives"]),
                   tuple(str(x) for x in d["sends"]))


@dataclass(frozen=True)
class Schedule:
    """A pipelined plan's step as ``hap.pipeline.price`` priced it, for its timeline: per
    micro-batch, each stage's ``F`` (its forward; 0 on the last stage) and ``B`` (its backward;
    forward and backward on the last stage), each cut's transfer each way; then per stage its
    gradient all-reduce (the weights several stages hold left out) and optimizer step, and on the
    stages that hold such weights (``tied_stages``) their all-reduce over all of them."""

    micro_batches: int
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    cut_s: tuple[float, ...]
    after_s: tuple[float, ...]
    tied_s: float
    bubble: float  # the share of the schedule's span a stage waits, on average
    name: str = "1f1b"  # the order of each stage's micro-batches (hap.runtime.pipeline.stage_order)
    tied_stages: tuple[int, ...] = ()  # the stages holding weights others hold too
    warmup: int = 0  # 1F1B: forwards each stage runs ahead beyond its own warm-up (stage_order)

    def tied_start_s(self, ends: Sequence[float]) -> float:
        """When the shared weights' all-reduce starts: once every stage that holds them is done
        with its own all-reduce and optimizer step (0 where no stage shares a weight)."""
        return max((ends[s] + self.after_s[s] for s in self.tied_stages), default=0.0)

    def step_s(self, ends: Sequence[float]) -> float:
        """The step, from each stage's end of schedule (``hap.pipeline.schedule_s``): then each
        stage's gradient all-reduce and optimizer step; the stages that share weights then sum
        their gradients, while the others are done."""
        own = max(e + a for e, a in zip(ends, self.after_s))
        return max(own, self.tied_start_s(ends) + self.tied_s) if self.tied_stages else own

    @property
    def shown(self) -> str:
        """The schedule's name as people write it, for tables, notes and pictures."""
        shown = {"1f1b": "1F1B", "gpipe": "GPipe"}.get(self.name, self.name)
        return f"{shown} (warm-up +{self.warmup})" if self.warmup else shown

    def summary(self, stages: int) -> str:
        """The pipeline in a phrase, as the plan's note, its stage table, its timeline and hap-bench
        say it: "2 stages, 1F1B (warm-up +1), 8 micro-batches, bubble 22%"."""
        m = self.micro_batches
        return f"{stages} stages, {self.shown}, {m} micro-batch{'es' if m != 1 else ''}, bubble {self.bubble:.0%}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "micro_batches": self.micro_batches, "forward_s": list(self.forward_s),
                "backward_s": list(self.backward_s), "cut_s": list(self.cut_s), "after_s": list(self.after_s),
                "tied_s": self.tied_s, "tied_stages": list(self.tied_stages), "bubble": self.bubble,
                "warmup": self.warmup}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Schedule:
        return cls(int(d["micro_batches"]), *(tuple(float(x) for x in d[k])
                                              for k in ("forward_s", "backward_s", "cut_s", "after_s")),
                   float(d["tied_s"]), float(d["bubble"]), str(d.get("name", "1f1b")),
                   # absent: the shared weights' all-reduce follows every stage's own
                   tuple(int(s) for s in d.get("tied_stages", range(len(d["after_s"])) if d["tied_s"] else ())),
                   int(d.get("warmup", 0)))


@dataclass(frozen=True)
class BaselineResult:
    """A baseline solved on the same cost model: its step time and shares, or why it is infeasible."""

    predicted_step_s: float | None
    shares: tuple[int, ...] = ()
    comm_s: float = 0.0
    reason: str = ""

    @property
    def feasible(self) -> bool:
        return self.predicted_step_s is not None

    def to_json(self) -> dict[str, Any]:
        if not self.feasible:
            return {"predicted_step_s": None, "feasible": False, "reason": self.reason}
        return {"predicted_step_s": self.predicted_step_s, "shares": list(self.shares), "comm_s": self.comm_s,
                "feasible": True}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BaselineResult:
        step = d.get("predicted_step_s")
        return cls(None if step is None else float(step), tuple(int(x) for x in d.get("shares", [])),
                   float(d.get("comm_s", 0.0)), str(d.get("reason", "")))


@dataclass(frozen=True)
class Plan:
    """Built once, by ``hap.search.assemble_plan`` (or ``from_json``); a changed plan is a new one
    (``dataclasses.replace``)."""

    graph: Graph
    cluster: Cluster
    shares: tuple[int, ...]
    nodes: dict[str, NodeChoice]  # every graph node by name
    moves: tuple[PlannedMove, ...]
    grad_synced: tuple[str, ...]
    predicted: Prediction
    baselines: dict[str, BaselineResult]  # by baseline name (hap.baselines)
    lower_bound_step_s: float
    solve_s: float
    solver_status: str
    optimizer: str = "sgd"
    strategy: str = "hap"  # which search result won: hap | dp_even | dp_proportional
    spec: str | None = None  # path of the model spec file (needed to emit)
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # why notable choices were made
    # per rank: how many micro-batches it runs its share in (to fit its memory); () is 1 each
    micro_batches: tuple[int, ...] = ()
    recompute: tuple[str, ...] = ()  # blocks (Graph.blocks) whose forward runs again in backward
    # per rank: how many of them (the first ones) it runs again (() is all, on every rank); a rank
    # keeps the others' activations and joins only their weights' gathers (hap.runtime.ops.recompute)
    recompute_counts: tuple[int, ...] = ()
    # a pipelined plan (hap.pipeline): its stages, in order; () is one stage, this plan itself.
    # ``shares`` are then each rank's samples in its stage, and ``micro_batches`` the pipeline's
    stages: tuple[Stage, ...] = ()
    schedule: Schedule | None = None  # a pipelined plan's: how its step was priced

    def recomputed_blocks(self, rank: int) -> int:
        """How many of the ``recompute`` blocks ``rank`` runs again in backward."""
        return self.recompute_counts[rank] if self.recompute_counts else len(self.recompute)

    @property
    def num_ranks(self) -> int:
        return len(self.shares)

    @property
    def global_batch(self) -> int:
        return sum(self.shares[r] for r in self.stages[0].ranks) if self.stages else sum(self.shares)

    @property
    def pipelined(self) -> bool:
        return len(self.stages) > 1

    def choice(self) -> dict[str, Candidate]:
        """The candidate chosen for every node, as the plan carries it (no rules are run again)."""
        return {name: n.candidate for name, n in self.nodes.items()}

    @property
    def precision(self) -> str:
        """The autocast dtype the program trains in ("fp32": no autocast)."""
        return self.graph.precision

    @property
    def predicted_step_s(self) -> float:
        return self.predicted.step_s

    def digest(self) -> str:
        nodes = {name: n.to_json() for name, n in self.nodes.items()}
        stages = [[list(st.ranks), st.plan.digest()] for st in self.stages]
        body = json.dumps({"nodes": nodes, "shares": list(self.shares), **({"stages": stages} if stages else {})},
                          sort_keys=True)
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
        batch = self.graph.global_batch()
        for ranks in [st.ranks for st in self.stages] or [range(len(self.shares))]:
            part = [self.shares[r] for r in ranks]
            need(batch is None or sum(part) == batch,
                 f"shares {part} of ranks {list(ranks)} sum to {sum(part)}, not the global batch {batch}")
        need(not self.stages or sorted(r for st in self.stages for r in st.ranks) == list(range(len(self.shares))),
             f"stages {[list(st.ranks) for st in self.stages]} do not hold every rank once")
        need(not self.recompute_counts or len(self.recompute_counts) == len(self.shares),
             f"{len(self.recompute_counts)} counts of recomputed blocks for {len(self.shares)} ranks; one per rank")
        need(all(0 <= k <= len(self.recompute) for k in self.recompute_counts),
             f"counts of recomputed blocks {self.recompute_counts} outside 0..{len(self.recompute)}")
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
                "micro_batches": int(self.micro_batches[r]) if self.micro_batches else 1,
                "recomputed_blocks": self.recomputed_blocks(r),
                "compute_s": self.predicted.compute_s[r],
                "memory_bytes": int(self.predicted.memory_bytes[r]),
                "memory_capacity_bytes": int(self.cluster.memory_bytes(r)),
            })
        return {
            "format": "hap-plan/1",
            "model": self.graph.model_name,
            "spec": self.spec,
            "digest": self.digest(),
            "strategy": self.strategy,
            "precision": self.precision,
            "grad_reduce": self.graph.grad_reduce,
            "global_batch": self.global_batch,
            "optimizer": self.optimizer,
            "recompute": list(self.recompute),
            "ranks": ranks,
            "predicted_step_s": self.predicted_step_s,
            "predicted": self.predicted.to_json(),
            "baselines": {k: b.to_json() for k, b in self.baselines.items()},
            "lower_bound_step_s": self.lower_bound_step_s,
            "solve_s": self.solve_s,
            "solver_status": self.solver_status,
            "nodes": {name: n.to_json() for name, n in self.nodes.items()},
            "moves": [m.to_json() for m in self.moves],
            "grad_synced": list(self.grad_synced),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "cluster": self.cluster.to_json(),
            "graph": self.graph.to_json(),
            **({"stages": [{**st.to_json(), "micro_batches": int(self.micro_batches[st.ranks[0]]
                                                                  if self.micro_batches else 1)}
                           for st in self.stages]} if self.stages else {}),
            **({"schedule": self.schedule.to_json()} if self.schedule else {}),
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
                nodes={name: NodeChoice.from_json(n) for name, n in d["nodes"].items()},
                moves=tuple(PlannedMove.from_json(m) for m in d["moves"]),
                grad_synced=tuple(str(x) for x in d["grad_synced"]),
                predicted=Prediction.from_json(d["predicted"]),
                baselines={str(k): BaselineResult.from_json(b) for k, b in d["baselines"].items()},
                lower_bound_step_s=float(d["lower_bound_step_s"]), solve_s=float(d["solve_s"]),
                solver_status=str(d["solver_status"]), optimizer=d.get("optimizer", "sgd"),
                strategy=d.get("strategy", "hap"), spec=d.get("spec"), warnings=tuple(d.get("warnings", [])),
                notes=tuple(d.get("notes", [])),
                micro_batches=tuple(int(r.get("micro_batches", 1)) for r in d["ranks"]),
                recompute=tuple(str(b) for b in d.get("recompute", [])),
                recompute_counts=_recompute_counts(d),
                stages=tuple(Stage.from_json(st) for st in d.get("stages", [])),
                schedule=Schedule.from_json(d["schedule"]) if d.get("schedule") else None,
            )
        except KeyError as e:
            raise PlanFileError(f"the plan lacks {e.args[0]!r}; re-plan with this version of hap") from None
        except HapError as e:  # its graph or cluster contradicts itself
            raise PlanFileError(f"the plan is malformed: {e}; re-plan with this version of hap") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise PlanFileError(f"the plan is malformed ({type(e).__name__}: {e}); re-plan with this version of hap") \
                from None
        plan.lint()
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


def _recompute_counts(d: dict[str, Any]) -> tuple[int, ...]:
    """Per rank, how many of a plan file's recomputed blocks it recomputes; () where every rank
    recomputes all of them."""
    n = len(d.get("recompute", []))
    counts = tuple(int(r.get("recomputed_blocks", n)) for r in d["ranks"])
    return counts if any(k < n for k in counts) else ()

"""Replay a Plan as a per-rank timeline: compute, communication and idle time per segment.

``simulate(plan)`` walks the captured graph the way the emitted ``train.py`` runs it:

- forward: the nodes in graph order; a resharding collective (a ``move``) runs just before
  the first node that reads the moved tensor (the loss's move to ``P`` at the end);
- backward: the nodes in reverse order; each collective's dual runs right after the
  backward of that first reader (autograd reaches it there), before its producer's backward,
  with the forward collective again where that reader's block is recomputed (a collective's
  seconds are per step, ``hap.cost.CostModel.step_move``: once per micro-batch in lockstep);
- the gradient all-reduce of replicated parameters, then the optimizer update (the compute
  the cost model charges each parameter node: zero_grad, the update's reads and writes of
  weight, gradient and optimizer state, and a replicated gradient's copy into its bucket),
  and the step ends.

Each node's compute per rank is ``hap.cost.CostModel.compute_s`` under the plan's own
setup (``hap.cost.CostSetup.of_plan``: shares, optimizer, micro-batches, recomputed blocks),
split into its forward part (work + one kernel floor per micro-batch) and backward part
(the rest). Every collective synchronises
all ranks: it starts when the last rank arrives.

Two modes:

``aligned`` (default): every node is its own segment whose length is its slowest rank's
    forward + backward time (the forward segment gets the slowest rank's forward part,
    the backward segment the rest), i.e. the solver's objective
    ``Σ_nodes max_r compute + Σ moves + grad sync``; ``simulate(plan).step_s`` reproduces
    ``plan.predicted_step_s``.
``segments``: ranks only meet at collectives; between two collectives each rank runs its
    nodes back to back, so a segment costs its slowest rank's *sum* (what SPMD really does,
    and what ``--emulate`` dilates). Never longer than ``aligned``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hap.cost import CostModel, CostSetup
from hap.errors import HapError
from hap.graph import Graph
from hap.moves import move
from hap.solve import Evaluation, evaluate, move_places

if TYPE_CHECKING:
    from hap.cluster import Cluster
    from hap.plan import Plan

MODES = ("aligned", "segments")


@dataclass
class Segment:
    """One interval of the step: every rank computes (``kind == "compute"``) or all communicate."""

    label: str  # node name(s), or the collective ("all_gather linear_1 S(1)->R")
    kind: str  # "compute" | "comm"
    phase: str  # "forward" | "backward" | "sync" | "step" (optimizer update)
    start_s: float
    duration_s: float
    compute_s: tuple[float, ...]  # per rank busy computing within the segment
    comm_s: float = 0.0  # seconds every rank spends in the collective

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    @property
    def idle_s(self) -> tuple[float, ...]:
        return tuple(max(self.duration_s - c - self.comm_s, 0.0) for c in self.compute_s)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "phase": self.phase, "start_s": self.start_s,
                "duration_s": self.duration_s, "compute_s": list(self.compute_s), "comm_s": self.comm_s}


@dataclass
class Timeline:
    name: str
    mode: str
    num_ranks: int
    rank_labels: list[str]
    segments: list[Segment] = field(default_factory=list)
    predicted_step_s: float | None = None  # the plan's own number, for comparison

    @property
    def step_s(self) -> float:
        return self.segments[-1].end_s if self.segments else 0.0

    def per_rank(self) -> list[dict[str, float]]:
        """Per rank totals: compute, comm, idle seconds (they sum to ``step_s``)."""
        out = []
        for r in range(self.num_ranks):
            c = sum(s.compute_s[r] for s in self.segments)
            m = sum(s.comm_s for s in self.segments)
            out.append({"compute_s": c, "comm_s": m, "idle_s": max(self.step_s - c - m, 0.0)})
        return out

    def add(self, label: str, kind: str, phase: str, duration: float, compute: tuple[float, ...],
            comm: float = 0.0) -> None:
        self.segments.append(Segment(label, kind, phase, self.step_s, duration, compute, comm))

    def lint(self) -> None:
        t = 0.0
        for s in self.segments:
            assert abs(s.start_s - t) <= 1e-12 * max(1.0, t), f"segment {s.label} does not start where the last ended"
            assert len(s.compute_s) == self.num_ranks
            assert all(c <= s.duration_s * (1 + 1e-9) + 1e-15 for c in s.compute_s), s.label
            t = s.end_s

    def summary(self) -> str:
        lines = [f"{self.name} ({self.mode}): step {self.step_s * 1e3:.3f} ms"]
        for r, d in enumerate(self.per_rank()):
            lines.append(f"  rank {r} {self.rank_labels[r]}: compute {d['compute_s'] * 1e3:.3f} ms, "
                         f"comm {d['comm_s'] * 1e3:.3f} ms, idle {d['idle_s'] * 1e3:.3f} ms")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode, "step_s": self.step_s, "num_ranks": self.num_ranks,
                "rank_labels": self.rank_labels, "predicted_step_s": self.predicted_step_s,
                "per_rank": self.per_rank(), "segments": [s.to_json() for s in self.segments]}


def _split(cm: CostModel, graph: Graph, name: str, total: tuple[float, ...]) -> tuple[tuple, tuple]:
    """(forward, backward) parts of a node's per-rank compute: the work splits as the backward
    factor says, each pass launches one kernel per micro-batch, and a forward run again in
    backward (a recomputed block on that rank, a chunked loss) is backward's."""
    node = graph[name]
    if node.kind != "op" or name not in cm.requires_grad or not any(total):
        return total, (0.0,) * len(total)
    bwd = cm.backward_factor(node)
    fwd, back = [], []
    for r, (t, factor) in enumerate(zip(total, cm.again_factor(node))):
        once = t / factor
        floor = cm.cluster.kernel_floor(r) * cm.micro[r]
        work = max(once - 2 * floor, 0.0) / (1 + bwd)
        fwd.append(once - (work * bwd + floor))
        back.append(t - fwd[-1])
    return tuple(fwd), tuple(back)


class _Replay:
    """Appends one step's segments to a timeline, in ``mode``."""

    def __init__(self, cm: CostModel, graph: Graph, choice: dict, tl: Timeline) -> None:
        self.cm, self.graph, self.choice, self.tl, self.n = cm, graph, choice, tl, tl.num_ranks
        self.parts = {node.name: _split(cm, graph, node.name, cm.compute_s(node, choice[node.name]))
                      for node in graph}
        self.pending = [0.0] * self.n  # segments mode: compute since the last collective, per rank
        self.pending_names: list[str] = []

    def flush(self, phase: str) -> None:
        if self.pending_names and any(self.pending):
            names = self.pending_names
            label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            self.tl.add(label, "compute", phase, max(self.pending), tuple(self.pending))
        self.pending = [0.0] * self.n
        self.pending_names = []

    def comm(self, label: str, phase: str, seconds: float) -> None:
        self.flush(phase)
        if seconds > 0:
            self.tl.add(label, "comm", phase, seconds, (0.0,) * self.n, seconds)

    def collective(self, m, back: bool) -> None:
        """Move ``m``'s forward collective, or (``back``) its backward dual."""
        fwd = m.priced.forward_s
        mv = move(m.src, m.dst)
        kind = mv.backward if back else mv.kind
        src, dst = (m.dst, m.src) if back else (m.src, m.dst)
        form = f" {m.priced.form}" if m.priced.form else ""
        self.comm(f"{kind}{form} {m.producer} {src}->{dst}", "backward" if back else "forward",
                  m.priced.seconds - fwd if back else fwd)

    def compute(self, name: str, phase: str) -> None:
        """A node's forward part (phases forward, step) or backward part; in aligned mode its own
        segments, the slowest rank's forward part and then the rest of its total."""
        fwd, back = self.parts[name]
        if self.tl.mode == "segments":
            mine = fwd if phase in ("forward", "step") else back
            if any(mine):
                self.pending = [p + x for p, x in zip(self.pending, mine)]
                self.pending_names.append(name)
            return
        total = tuple(f + b for f, b in zip(fwd, back))
        if not any(total):
            return
        crit = max(range(self.n), key=lambda r: total[r])
        if phase in ("forward", "step"):
            dur = fwd[crit]
            self.tl.add(name, "compute", phase, dur, tuple(min(f, dur) for f in fwd))
        else:
            dur = total[crit] - fwd[crit]
            if dur > 0 or any(back):
                done = tuple(min(f, fwd[crit]) for f in fwd)
                self.tl.add(name, "compute", phase, dur, tuple(min(t - d, dur) for t, d in zip(total, done)))

    def step(self, ev: Evaluation) -> None:
        """Forward, backward, the gradient all-reduce and the optimizer update; ``ev`` is the
        evaluation of the replayed choice."""
        places, last = move_places(self.graph, self.choice, ev.moves)
        before = {v: [ev.moves[i] for i in ids] for v, ids in places.items()}
        after_loss = [ev.moves[i] for i in last]
        for node in self.graph:
            for m in before.get(node.name, []):
                self.collective(m, back=False)
            if node.kind != "param":  # a parameter's own cost is its optimizer update, in the step phase
                self.compute(node.name, "forward")
        for m in after_loss:
            self.collective(m, back=False)
        self.flush("forward")
        for m in reversed(after_loss):
            self.collective(m, back=True)
        for node in reversed(list(self.graph)):
            self.compute(node.name, "backward")
            for m in reversed(before.get(node.name, [])):
                self.collective(m, back=True)
        self.flush("backward")
        if ev.grad_sync_s > 0:
            self.comm(f"gradient all-reduce ({len(ev.grad_synced)} parameters)", "sync", ev.grad_sync_s)
        for node in self.graph.params():
            self.compute(node.name, "step")
        self.flush("step")


def simulate(plan: Plan, cluster: Cluster | None = None, mode: str = "aligned", name: str | None = None) -> Timeline:
    """The per-rank timeline of one training step of ``plan`` (see the module docstring), priced
    under the plan's own setup (``hap.cost.CostSetup.of_plan``).

    ``cluster`` (default: the plan's own) replays the same plan on another cluster with as
    many ranks, e.g. the same machines with re-measured device profiles.
    """
    if isinstance(cluster, str):  # simulate(plan, "segments"): the mode given positionally
        cluster, mode = None, cluster
    if plan.pipelined:
        raise HapError("a pipelined plan's step is its stages' schedule, which this per-rank replay does not model: "
                       "hap-plan --timeline PNG draws the schedule (or plan with --stages 1 for a replay)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    graph, cluster = plan.graph, cluster or plan.cluster
    n = cluster.num_ranks
    if n != plan.num_ranks:
        raise HapError(f"the plan is for {plan.num_ranks} ranks; cluster {cluster.name} has {n}")
    cm = CostSetup.of_plan(plan).cost_model(graph, cluster)
    choice = plan.choice()
    labels = [f"{r.device}" + (f" x{r.slowdown:g} slower" if r.slowdown != 1 else "") for r in cluster.ranks]
    tl = Timeline(name or plan.strategy, mode, n, labels, predicted_step_s=plan.predicted_step_s)
    _Replay(cm, graph, choice, tl).step(evaluate(graph, cm, choice))
    tl.lint()
    return tl


def step_times(plan: Plan) -> dict[str, float]:
    """Both modes' step times and the plan's own prediction."""
    return {"predicted_s": plan.predicted_step_s, "aligned_s": simulate(plan, mode="aligned").step_s,
            "segments_s": simulate(plan, mode="segments").step_s}


def timeline_for_baseline(plan: Plan, name: str, mode: str = "aligned") -> Timeline | None:
    """The timeline of baseline ``name`` (``hap.baselines.BASELINES``) on ``plan``'s graph and cluster.

    None where the baseline does not apply (``megatron_tp_even`` without weight matrices).
    """
    from hap.baselines import baseline

    base = baseline(name, plan.graph, plan.cluster, optimizer=plan.optimizer, spec=plan.spec)
    if base is None:
        return None
    return simulate(base, mode=mode, name=name)


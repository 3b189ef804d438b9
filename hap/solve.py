"""The solve: per-node sharding, per-edge collectives and integer per-rank shares.

MILP with the shares fixed (``solve_placements``, built by ``_PlacementMilp``), PuLP + HiGHS
(CBC where PuLP cannot run HiGHS, ``_run_milp``):

  variables
    y[n,c] ∈ {0,1}      node n takes candidate c            (identical layers share y: ``tie_groups``)
    z[u,v,k][p,q] ≥ 0   u's output, produced in p, is read by input k of v in q
    mv[u,p,q] ≥ 0       u is converted from p to q (one collective, reused by all readers)
  constraints
    Σ_c y[n,c] = 1                                                    ``_one_hot``
    Σ_q z[u,v,k][p,q] = Σ_{c: out(c)=p} y[u,c]                        ``_transport``
    Σ_p z[u,v,k][p,q] = Σ_{c: c reads input k as q} y[v,c]            ``_transport``
    mv[u,p,q] ≥ z[u,v,k][p,q]  ∀ readers (v,k)                        ``_moves``
    conversions priced INF (a list output re-placed): z[u,v,k][p,q] ≤ 0  ``_moves``
    Σ_n mem_r(n, c)·y[n,c] ≤ memory of rank r                         ``_memory``
  objective (predicted step time, seconds)
    Σ_{n,c} y·max_r compute_r(n,c) + Σ mv·collective(p→q) + Σ_params y[param,R]·grad all-reduce
                                                                      ``_compute``, ``_edges``

The shares are then re-fitted (``refit_shares``, HAP's ratio LP): with placements fixed, an
LP over continuous ratios x_r minimises Σ_n max_r(compute_r(x_r)) (``_refit_shares``);
rounding gives integer shares, and the MILP runs again until the step time stops improving.
Every candidate plan is scored by ``evaluate`` with exact integer lengths, which is what
the plan reports; the data-parallel baselines are the same MILP with parameters pinned
replicated and the batch sharded, so the final plan is never worse than them.
"""
from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pulp

if TYPE_CHECKING:
    from hap.cluster import Cluster
from hap.cost import BUCKET_CAPS, GRAD_BUCKET_BYTES, INF, CostModel, PricedMove, weight_gather
from hap.errors import InfeasiblePlan
from hap.graph import Graph, Node, TensorMeta
from hap.moves import COLLECTIVES
from hap.placement import Placement, R, S
from hap.quiet import library_output
from hap.rules import FORWARD_COLLECTIVE_EMITS, Candidate, RuleContext, candidates
from hap.rules.token_wise import token_wise_candidates
from hap.runtime.shares import largest_remainder

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# candidates of every node (placeholders included)
# ---------------------------------------------------------------------------------------
def source_candidates(node: Node, ctx: RuleContext) -> list[Candidate]:
    m = node.meta
    if not isinstance(m, TensorMeta):
        return [Candidate("R", (), R)]
    out = [Candidate("R", (), R)]
    if node.kind == "input":
        if m.ndim and m.shape[0] >= 2 and ctx.num_ranks > 1:
            out.append(Candidate("S(0)", (), S(0), split=(m.shape[0], 1)))
    elif node.kind == "param":
        for d in range(m.ndim):
            for u in ctx.shard_units(m.shape[d]):
                out.append(Candidate(str(S(d, u)), (), S(d, u), split=(m.shape[d], u)))
    return out


def all_candidates(graph: Graph, ctx: RuleContext, strict: bool = False) -> dict[str, list[Candidate]]:
    """Every node's candidates; the ops of a token-wise module call have only theirs
    (``hap.rules.token_wise``: ``rows``, and ``experts`` where its experts can be sharded)."""
    rows, _ = token_wise_candidates(graph, ctx)
    out = {}
    for n in graph:
        if n.name in rows:
            out[n.name] = rows[n.name]
        else:
            out[n.name] = candidates(n, ctx, strict) if n.kind == "op" else source_candidates(n, ctx)
    return out


def tie_groups(graph: Graph) -> dict[str, str]:
    """node -> representative node: the same op in every instance of a repeated layer."""
    reps: dict[tuple, str] = {}
    out: dict[str, str] = {}
    counters: dict[tuple, int] = {}
    for n in graph:
        path = n.target if n.kind in ("param", "buffer") else n.module.split(" ")[0]
        if n.kind == "input" or not re.search(r"\.\d+(\.|$)", path):
            out[n.name] = n.name
            continue
        generic = re.sub(r"\.\d+(?=\.|$)", ".*", path)
        instance = tuple(re.findall(r"\.(\d+)(?=\.|$)", path))
        ins = tuple(str(getattr(graph[i], "meta", None)) for i in n.inputs())
        sig = (generic, n.kind, n.target if n.kind == "op" else "", str(n.meta), ins)
        k = counters.get((sig, instance), 0)
        counters[(sig, instance)] = k + 1
        key = (sig, k)
        out[n.name] = reps.setdefault(key, n.name)
    return out


# ---------------------------------------------------------------------------------------
# scoring a complete assignment
# ---------------------------------------------------------------------------------------
@dataclass
class ChosenMove:
    producer: str
    src: Placement
    dst: Placement
    priced: PricedMove


def move_places(graph: Graph, choice: dict[str, Candidate],
                moves: list[ChosenMove]) -> tuple[dict[str, list[int]], list[int]]:
    """Where each of ``moves`` (by index) runs, as the program emits it: before its first reader
    in forward order that reads it in its new placement (reader -> indices, in order), or after
    the loss (its move to P)."""
    order = {node.name: i for i, node in enumerate(graph)}
    rd = readers(graph)
    before: dict[str, list[int]] = {}
    after_loss: list[int] = []
    for i, m in enumerate(moves):
        first = min((v for v, k in rd[m.producer] if choice[v].inputs[k] == m.dst), key=order.get, default=None)
        if first is None:
            after_loss.append(i)
        else:
            before.setdefault(first, []).append(i)
    return before, after_loss


def collective_temporary(graph: Graph, cm: CostModel, choice: dict[str, Candidate],
                         moves: list[ChosenMove]) -> float:
    """The most a plan's collectives allocate at once while they run: one at a time, except a
    block's weight gathers (``hap.runtime.Prefetch``), all in flight at once where they start
    with the block, else two (while gather i is waited for, i+1 is in flight); a weight
    gathered as its low-precision copy moves that copy."""
    sizes = [cm.move_temporary_bytes(cm.moved_meta(graph[m.producer], m.src, m.dst), m.src, m.dst, m.priced)
             for m in moves]
    before, _ = move_places(graph, choice, moves)
    blocks = graph.blocks()
    together = []
    for b, gathers in block_gathers(graph, moves, before).items():
        if gathers_ahead(graph, choice, moves, before, blocks[b]) is None:
            together.append(sum(sizes[i] for i in gathers))
        else:
            together += [sizes[i] + sizes[j] for i, j in zip(gathers, gathers[1:])]
    return max(sizes + together, default=0.0)


def block_gathers(graph: Graph, moves: list[ChosenMove], before: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per block, the weight gathers (``hap.cost.weight_gather``, by index in ``moves``) it starts
    ahead of use, in the order it takes them (``hap.runtime.Prefetch``); ``before`` is where
    the moves run (``move_places``)."""
    out: dict[str, list[int]] = {}
    for b, names in graph.blocks().items():
        gathers = [i for v in names for i in before.get(v, [])
                   if weight_gather(graph[moves[i].producer], moves[i].src, moves[i].dst)]
        if gathers:
            out[b] = gathers
    return out


def gathers_ahead(graph: Graph, choice: dict[str, Candidate], moves: list[ChosenMove], before: dict[str, list[int]],
                  names: list[str]) -> int | None:
    """How many of a block's weight gathers run ahead of the one it waits for, as
    ``hap.emit`` writes its ``hr.Prefetch``: all of them (None) where the block (its nodes
    ``names``) runs no other collective, else one, so that its other collectives do not queue
    behind all of its gathers."""
    for v in names:
        if choice[v].emit in FORWARD_COLLECTIVE_EMITS:
            return 1
        for i in before.get(v, []):
            m = moves[i]
            if m.priced.kind in COLLECTIVES and not weight_gather(graph[m.producer], m.src, m.dst):
                return 1
    return None


def kept_bytes(graph: Graph, cm: CostModel, choice: dict[str, Candidate]) -> tuple[float, ...]:
    """Per rank, the bytes of the weights ``choice`` gathers whole and keeps until backward
    (``CostModel.kept_move_bytes``)."""
    rd = readers(graph)
    kept = [0.0] * cm.n
    for p in graph.params():
        src = choice[p.name].output
        for q in {choice[v].inputs[k] for v, k in rd[p.name]} - {src}:
            kept = [a + b for a, b in zip(kept, cm.kept_move_bytes(p, src, q))]
    return tuple(kept)


@dataclass
class Evaluation:
    step_s: float
    compute_s: tuple[float, ...]  # per rank, sum over nodes (what the rank itself computes)
    critical_compute_s: float  # sum over nodes of the slowest rank
    comm_s: float  # resharding collectives, forward + backward
    grad_sync_s: float  # all-reduce of replicated parameters' gradients
    memory_bytes: tuple[float, ...]
    moves: list[ChosenMove] = field(default_factory=list)
    grad_synced: list[str] = field(default_factory=list)
    grad_buckets: list[list[str]] = field(default_factory=list)  # all-reduced in this order
    grad_overlap: bool = False  # buckets launch during backward, as their gradients are ready
    optimizer_s: float = 0.0  # of critical_compute_s: the parameters' update (sum over them of the slowest rank)
    data_s: float = 0.0  # of critical_compute_s: reading the batch (sum over the inputs of the slowest rank)


def readers(graph: Graph) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {n.name: [] for n in graph}
    for v in graph.ops():
        for k, ref in enumerate(v.inputs()):
            out[ref].append((v.name, k))
    return out


def evaluate(graph: Graph, cm: CostModel, choice: dict[str, Candidate]) -> Evaluation:
    n = cm.n
    per_rank = [0.0] * n
    critical = 0.0
    mem = [0.0] * n
    by_kind = {"param": 0.0, "input": 0.0}
    for node in graph:
        c = choice[node.name]
        t = cm.compute_s(node, c)
        critical += max(t)
        if node.kind in by_kind:
            by_kind[node.kind] += max(t)
        for r in range(n):
            per_rank[r] += t[r]
        for r, b in enumerate(cm.memory_bytes(node, c)):
            mem[r] += b
    mem = [m + peak for m, peak in zip(mem, cm.activation_reserve)]  # a recomputed block's, the largest transient
    moves = []
    comm = 0.0
    rd = readers(graph)
    for node in graph:
        if not isinstance(node.meta, TensorMeta):
            continue
        src = choice[node.name].output
        wanted = {choice[v].inputs[k] for v, k in rd[node.name]}
        if node.name == graph.loss:
            wanted.add(Placement("P"))
        for q in sorted(wanted):
            if q == src:
                continue
            conv = cm.step_move(node, src, q)
            moves.append(ChosenMove(node.name, src, q, conv))
            comm += conv.seconds
    if cm.n > 1 and all(cm.cluster.profile(r).overlap_comm for r in range(cm.n)):
        moves, comm = prefetched(graph, cm, choice, moves)
    synced = [p.name for p in graph.params()
              if choice[p.name].output.kind == "R" and isinstance(p.meta, TensorMeta) and p.name in cm.requires_grad]
    overlap = cm.n > 1 and overlap_blocker(cm.cluster, cm.n, [m.priced.kind for m in moves]) is None
    buckets, gs = grad_sync_schedule(graph, cm, choice, synced, overlap)
    # the collectives' buffers, and the weights gathered and saved whole
    temporary = collective_temporary(graph, cm, choice, moves)
    mem = [x + temporary + k for x, k in zip(mem, kept_bytes(graph, cm, choice))]
    return Evaluation(critical + comm + gs, tuple(per_rank), critical, comm, gs, tuple(mem), moves,
                      [p for b in buckets for p in b], buckets, overlap, by_kind["param"], by_kind["input"])


def overlap_blocker(cluster: Cluster, n: int, move_kinds: Sequence[str]) -> str | None:
    """Why the gradient buckets cannot be all-reduced while backward runs, or None if they can:
    a device that cannot compute while it communicates (its profile's ``overlap_comm``: CPU
    ranks share the cores gloo needs), or a backward that runs collectives of its own (they
    would queue behind the buckets on the one process group)."""
    slow = sorted({cluster.profile(r).name for r in range(n) if not cluster.profile(r).overlap_comm})
    if slow:
        return (f"{', '.join(slow)} cannot compute while it communicates (its profile's overlap_comm is false: "
                "the collectives' threads take the cores the compute runs on)")
    own = sorted({kind for kind in move_kinds if kind in COLLECTIVES})
    if own:
        return f"backward runs collectives of its own ({', '.join(own)}), which would queue behind the buckets"
    return None


def prefetched(graph: Graph, cm: CostModel, choice: dict[str, Candidate],
               moves: list[ChosenMove]) -> tuple[list[ChosenMove], float]:
    """``moves`` with each weight gather (``hap.cost.weight_gather``) priced as it runs on devices
    that overlap: a gather a block starts one ahead of use by what of its forward outlasts the
    compute before its use (``prefetch_exposure``, again where its block is recomputed), every
    weight's reduce-scatter by its part of what outlasts backward (``scatter_exposure``), in
    every run; and their total."""
    gathers = {i: cm.run_move(graph[m.producer], m.src, m.dst) for i, m in enumerate(moves)
               if weight_gather(graph[m.producer], m.src, m.dst)}  # one run of each
    exposed = prefetch_exposure(graph, cm, choice, moves)
    behind = scatter_exposure(graph, cm, choice, moves, {i: one.seconds - one.forward_s for i, one in gathers.items()})
    out = list(moves)
    for i, one in gathers.items():
        m = moves[i]
        rounds, rerun = cm.move_runs(graph[m.producer])
        ahead = exposed.get(i, one.forward_s)  # a gather outside any block waits whole
        out[i] = ChosenMove(m.producer, m.src, m.dst, PricedMove(
            m.priced.kind, m.priced.form, rounds * (ahead * (2 if rerun else 1) + behind[i]), rounds * ahead))
    return out, sum(m.priced.seconds for m in out)


def scatter_exposure(graph: Graph, cm: CostModel, choice: dict[str, Candidate], moves: list[ChosenMove],
                     scatters: dict[int, float]) -> dict[int, float]:
    """Of one run's backward, the seconds each deferred reduce-scatter (``scatters``: index in
    ``moves`` -> its seconds) leaves exposed, as ``hap.runtime.collectives.deferred_grads`` runs
    them: each starts once backward has passed its weight's reader, behind the ones before it on
    the one process group, while backward computes on (nodes at the slowest rank's backward and
    recomputed forward); a synchronous collective of backward waits for those in flight, and
    what is still running when backward ends is waited for. The exposed seconds are shared out
    in proportion to the scatters' own."""
    if not scatters:
        return {}
    before, _ = move_places(graph, choice, moves)
    per_run = max(cm.micro)
    now = channel = waited = 0.0
    for node in reversed(list(graph)):
        if node.kind == "op" and node.name in cm.requires_grad:
            now += cm.forward_backward_s(node, choice[node.name])[1] / per_run
        for i in reversed(before.get(node.name, [])):
            if i in scatters:
                channel = max(now, channel) + scatters[i]
            else:
                m = moves[i]
                if m.priced.seconds > m.priced.forward_s:
                    waited += max(channel - now, 0.0)
                    now = max(now, channel) + (m.priced.seconds - m.priced.forward_s) / per_run
                    channel = now
    exposed = waited + max(channel - now, 0.0)
    whole = sum(scatters.values())
    return {i: exposed * t / whole if whole > 0 else 0.0 for i, t in scatters.items()}


def prefetch_exposure(graph: Graph, cm: CostModel, choice: dict[str, Candidate],
                      moves: list[ChosenMove]) -> dict[int, float]:
    """Per weight gather that a block starts ahead of use (``block_gathers``), by index in
    ``moves``, the seconds of one run of its forward that the rank waits for it, as the program
    runs the block: where the block runs no other collective, its gathers all start with it, one
    after the other on the one process group; else the first starts with the block, and taking
    gather i starts gather i+1 (behind i), then waits for i, and the block's other collectives
    wait for the gathers in flight (``gathers_ahead``). Ops compute at the slowest rank's
    forward part of one run. A recomputed block runs the same schedule again in backward."""
    before, _ = move_places(graph, choice, moves)
    blocks = graph.blocks()
    exposed: dict[int, float] = {}
    per_run = max(cm.micro)  # a weight moves whole in each micro-batch, an activation a k-th of its rows
    for b, gathers in block_gathers(graph, moves, before).items():
        ahead = gathers_ahead(graph, choice, moves, before, blocks[b])
        now, channel, ends = 0.0, 0.0, {}
        for i in gathers[:1] if ahead else gathers:  # started with the block
            channel += moves[i].priced.forward_s / per_run
            ends[i] = channel
        last = gathers[0] if ahead else gathers[-1]
        for v in blocks[b]:
            for i in before.get(v, []):
                one = moves[i].priced.forward_s / per_run
                if i not in gathers:  # a synchronous collective waits for the gathers in flight
                    if channel > now:
                        exposed[last] = exposed.get(last, 0.0) + channel - now
                    now = max(now, channel) + one
                    channel = now
                    continue
                k = gathers.index(i)
                if ahead and k + 1 < len(gathers):
                    last = gathers[k + 1]
                    channel = max(now, channel) + moves[last].priced.forward_s / per_run
                    ends[last] = channel
                wait = max(ends[i] - now, 0.0)
                exposed[i] = exposed.get(i, 0.0) + wait
                now += wait
            node = graph[v]
            if node.kind == "op":  # its forward: not its backward, nor its recomputation in backward
                now += cm.forward_backward_s(node, choice[v])[0] / per_run
    return exposed


def grad_sync_schedule(graph: Graph, cm: CostModel, choice: dict[str, Candidate], synced: list[str],
                       overlap: bool) -> tuple[list[list[str]], float]:
    """Buckets of the replicated parameters' gradients, in the order backward completes them, and
    the all-reduce time left exposed after backward.

    Backward visits nodes in reverse; a parameter's gradient is complete once its first reader's
    (in forward order) backward ran. Each bucket is all-reduced when its last gradient is ready
    and the previous bucket is done (one process group: collectives run in order); with
    ``overlap`` off, or for the last bucket (it carries the loss), that is after backward. With
    ``overlap`` the bucket size is the plan's choice: of ``BUCKET_CAPS``, the one that leaves
    the least exposed (small buckets start sooner, each pays the collective's latency), the
    largest of equals; without it, buckets of GRAD_BUCKET_BYTES, all after backward.
    """
    if not synced or cm.n <= 1:
        return ([synced] if synced else []), 0.0
    order = {node.name: i for i, node in enumerate(graph)}
    first_reader: dict[str, int] = {}
    for node in graph.ops():
        for ref in node.inputs():
            first_reader.setdefault(ref, order[node.name])
    # backward time (slowest rank per node) accumulated from the loss back to each node
    done_at: dict[int, float] = {}
    clock = 0.0
    for node in reversed(list(graph)):
        if node.kind == "op" and node.name in cm.requires_grad:
            clock += cm.forward_backward_s(node, choice[node.name])[1]
        done_at[order[node.name]] = clock
    bwd_total = clock
    ready = {p: done_at.get(first_reader.get(p, 0), bwd_total) for p in synced}
    params = sorted(synced, key=lambda p: (ready[p], -order[p]))

    def schedule(cap: float) -> tuple[list[list[str]], float]:
        buckets: list[list[str]] = [[]]
        size = 0
        for p in params:  # a bucket closes once it holds ``cap`` bytes
            buckets[-1].append(p)
            size += graph[p].meta.nbytes
            if size >= cap:
                buckets.append([])
                size = 0
        buckets = [b for b in buckets if b]
        end = 0.0
        for i, b in enumerate(buckets):
            nbytes = sum(graph[p].meta.nbytes for p in b)
            start = max(ready[b[-1]] if overlap and i < len(buckets) - 1 else bwd_total, end)
            end = start + cm.grad_bucket_s(nbytes)
        return buckets, max(end - bwd_total, 0.0)

    if not overlap:
        return schedule(GRAD_BUCKET_BYTES)
    return min((schedule(cap) for cap in sorted(BUCKET_CAPS, reverse=True)), key=lambda t: t[1])  # first of equals


# ---------------------------------------------------------------------------------------
# the MILP with shares fixed
# ---------------------------------------------------------------------------------------
@dataclass
class MilpResult:
    choice: dict[str, Candidate]
    status: str
    objective: float
    seconds: float


def solve_placements(graph: Graph, cm: CostModel, cands: dict[str, list[Candidate]], *,
                     pin: Callable[[Node, Candidate], bool] | None = None, tie: bool = True,
                     time_limit_s: float = 30.0, solver: str = "highs", memory: bool = True) -> MilpResult:
    """``memory=False`` drops the per-rank memory rows (to explain an infeasible plan)."""
    with warnings.catch_warnings():  # PuLP 3.x deprecates LpVariable(...) in favour of a 4.0 API
        warnings.simplefilter("ignore", DeprecationWarning)
        return _solve_placements(graph, cm, cands, pin, tie, time_limit_s, solver, memory)


def _solve_placements(graph: Graph, cm: CostModel, cands: dict[str, list[Candidate]],
                      pin: Callable[[Node, Candidate], bool] | None, tie: bool, time_limit_s: float,
                      solver: str, memory: bool = True) -> MilpResult:
    t0 = time.perf_counter()
    milp = _PlacementMilp(graph, cm, cands, pin, tie, memory)
    prob = milp.prob
    t_build = time.perf_counter() - t0
    solver_text = _run_milp(prob, solver, time_limit_s)
    log.info("MILP: %d variables, %d constraints, built in %.2fs, solved in %.2fs",
             len(prob.variables()), len(prob.constraints), t_build, time.perf_counter() - t0 - t_build)
    status = pulp.LpSolution.get(prob.sol_status, str(prob.sol_status))
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        if solver_text.strip():
            log.info("the solver printed:\n%s", solver_text.rstrip())
        raise InfeasiblePlan(f"the solver found no plan ({status}, {pulp.LpStatus[prob.status]})")
    obj = pulp.value(prob.objective) or 0.0
    return MilpResult(milp.choice(), status, float(obj), time.perf_counter() - t0)


def _run_milp(prob: pulp.LpProblem, solver: str, time_limit_s: float) -> str:
    """Solve ``prob`` with HiGHS for ``solver="highs"``, with CBC for any other name, and return
    what the solver printed. Where PuLP cannot run HiGHS (it raises ``PulpSolverError`` before it
    reads the problem, e.g. without ``highspy``), CBC solves the same problem instead."""
    cbc = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s)
    if solver != "highs":
        return run_solver(prob, cbc)
    try:
        return run_solver(prob, pulp.HiGHS(msg=False, timeLimit=time_limit_s, mip=True))
    except pulp.PulpSolverError:
        return run_solver(prob, cbc)


class _PlacementMilp:
    """The placement MILP of one ``solve_placements`` call, one method per family of variables
    and constraints. Tied nodes share their representative's choice variables, so a node's
    choices are read through ``choices``."""

    def __init__(self, graph: Graph, cm: CostModel, cands: dict[str, list[Candidate]],
                 pin: Callable[[Node, Candidate], bool] | None, tie: bool, memory: bool):
        self.graph, self.cm = graph, cm
        self.rep = tie_groups(graph) if tie else {n.name: n.name for n in graph}
        self.allowed = self._allowed(cands, pin)
        self.members: dict[str, list[str]] = {}  # representative -> its tied nodes, itself included
        for name in self.rep:
            self.members.setdefault(self.rep[name], []).append(name)
        self.prob = pulp.LpProblem("hap_placements", pulp.LpMinimize)
        self.y: dict[tuple[str, str], pulp.LpVariable] = {}
        self.z: dict[tuple, dict[tuple[Placement, Placement], Any]] = {}
        self.moves: dict[tuple, tuple[Any, float, int]] = {}  # (mkey, p, q) -> (mv, seconds, producers)
        self.kept: dict[tuple, tuple[float, ...]] = {}  # (mkey, p, q) -> per rank, bytes its moves keep until backward
        self.objective: list = []
        self._readers = readers(graph)
        self._one_hot()
        self._compute()
        self._edges()
        if memory:
            self._memory()
        self.prob += pulp.lpSum(self.objective)

    def _allowed(self, cands: dict[str, list[Candidate]],
                 pin: Callable[[Node, Candidate], bool] | None) -> dict[str, list[Candidate]]:
        """Each node's candidates that ``pin`` admits (its first where ``pin`` admits none). A
        representative keeps only what all its members can take, unless that leaves it none.
        An op of a block that only some ranks recompute takes no candidate that runs a collective
        in forward (``CostModel.recomputed_mixed``)."""
        mixed = self.cm.recomputed_mixed

        def admits(name: str, c: Candidate) -> bool:
            if name in mixed and c.emit in FORWARD_COLLECTIVE_EMITS:
                return False
            return pin is None or pin(self.graph[name], c)

        allowed = {name: [c for c in cs if admits(name, c)] or cs[:1] for name, cs in cands.items()}
        for name, own in list(allowed.items()):
            r = self.rep[name]
            if r != name:
                names = {c.name for c in own}
                allowed[r] = [c for c in allowed[r] if c.name in names] or allowed[r]
        return allowed

    def choices(self, name: str) -> list[tuple[Candidate, pulp.LpVariable]]:
        r = self.rep[name]
        return [(c, self.y[r, c.name]) for c in self.allowed[r]]

    def _one_hot(self) -> None:
        """y[n,c] ∈ {0,1} for each representative's candidates, and Σ_c y[n,c] = 1."""
        for name, cs in self.allowed.items():
            if self.rep[name] == name:
                for i, c in enumerate(cs):
                    self.y[name, c.name] = pulp.LpVariable(f"y_{_safe(name)}_{i}", cat="Binary")
                self.prob += pulp.lpSum(self.y[name, c.name] for c in cs) == 1, f"one_{_safe(name)}"

    def _compute(self) -> None:
        """Objective terms of node compute and of each replicated parameter's gradient all-reduce,
        counted once per tied member; the all-reduce latency is paid once, through
        ``any_grad_sync`` ≥ y[param, R]."""
        any_grad_sync = pulp.LpVariable("any_grad_sync", 0, 1)
        for name, ms in self.members.items():
            node = self.graph[name]
            for c, v in self.choices(name):
                cost = self.cm.node_s(node, c)
                if node.kind == "param" and c.output.kind == "R" and isinstance(node.meta, TensorMeta):
                    cost += self.cm.grad_sync_s(node.meta)
                    self.prob += any_grad_sync >= v
                if cost:
                    self.objective.append(len(ms) * cost * v)
        self.objective.append(self.cm.grad_sync_latency_s() * any_grad_sync)

    def _edges(self) -> None:
        """Per tensor, a transport to each reader (``_transport``) and the collectives the
        transports need (``_moves``); the loss is also read in P, as ``evaluate`` scores it."""
        rd = self._readers
        for node in self.graph:
            u = node.name
            if not isinstance(node.meta, (TensorMeta, list)):
                continue
            outs: dict[Placement, list] = {}
            for c, v in self.choices(u):
                outs.setdefault(c.output, []).append(v)
            edges = [((self.rep[v], k), [(c.inputs[k], var) for c, var in self.choices(v)]) for v, k in rd[u]]
            if u == self.graph.loss:
                edges.append((("<loss>", 0), [(Placement("P"), 1)]))
            reader_keys = []
            for (rv, k), ins in edges:
                key = (self.rep[u], rv, k)
                reader_keys.append(key)
                if key not in self.z:  # tied producer-reader pairs share one transport
                    self._transport(key, outs, ins)
            self._moves(node, reader_keys)
        for mv, cost, count in self.moves.values():
            self.objective.append(cost * count * mv)

    def _transport(self, key: tuple, outs: dict[Placement, list], ins: list[tuple[Placement, Any]]) -> None:
        """z[key][p,q] ≥ 0, the producer's output in p read by the reader in q: its rows sum to
        the producer's y of output p, its columns to the reader's y of input q, so with one-hot
        y the one cell that is 1 is the (p, q) the plan takes."""
        i = len(self.z)
        want: dict[Placement, list] = {}
        for q, var in ins:
            want.setdefault(q, []).append(var)
        cells = {}
        for pi, p in enumerate(sorted(outs)):
            for qi, q in enumerate(sorted(want)):
                cells[p, q] = pulp.LpVariable(f"z_{i}_{pi}_{qi}", 0)
        for pi, p in enumerate(sorted(outs)):
            self.prob += pulp.lpSum(cells[p, q] for q in want) == pulp.lpSum(outs[p]), f"zo_{i}_{pi}"
        for qi, q in enumerate(sorted(want)):
            self.prob += pulp.lpSum(cells[p, q] for p in outs) == pulp.lpSum(want[q]), f"zi_{i}_{qi}"
        self.z[key] = cells

    def _moves(self, node: Node, reader_keys: list[tuple]) -> None:
        """mv ≥ z[key][p,q] over the readers of ``node``, for each conversion p→q that costs time.
        One mv serves every reader, so a collective is paid once however many read it; tied
        producers with tied readers share the mv (keyed by representative and readers), priced
        once per producer. A conversion that cannot be made (a list output re-placed, a collective
        inside a chunked loss's chain or, but a weight's gather, inside a block only some ranks
        recompute, or one the cost model prices INF) bounds its cells to 0."""
        u = node.name
        mkey = (self.rep[u], tuple(sorted(set(reader_keys))))
        # the program runs a chunked loss's chain as one op; the ranks that keep a block's
        # activations join only its weights' gathers again in backward (hap.runtime.ops.recompute)
        in_mixed = any(v in self.cm.recomputed_mixed for v, _ in self._readers[u])
        for p, q in sorted({pq for key in reader_keys for pq in self.z[key]}):
            if p == q:
                continue
            if isinstance(node.meta, list) or u in self.cm.unkept:
                cost = INF
            else:
                priced = self.cm.step_move(node, p, q)
                cost = priced.seconds
                if in_mixed and priced.kind in COLLECTIVES and not weight_gather(node, p, q):
                    cost = INF
            if cost == 0:
                continue
            if cost == INF:
                for key in set(reader_keys):
                    if (p, q) in self.z[key]:
                        self.z[key][p, q].upBound = 0
                continue
            if (mkey, p, q) not in self.moves:
                mv = pulp.LpVariable(f"mv_{len(self.moves)}", 0)
                for key in set(reader_keys):
                    if (p, q) in self.z[key]:
                        self.prob += mv >= self.z[key][p, q], f"mv_{len(self.moves)}_{_safe(str(key))}"
                self.moves[mkey, p, q] = (mv, cost, 0)
            mv, c0, count = self.moves[mkey, p, q]
            self.moves[mkey, p, q] = (mv, c0, count + 1)
            kept = self.cm.kept_move_bytes(node, p, q)
            if any(kept):  # bytes per rank, per tied producer
                before = self.kept.get((mkey, p, q), (0.0,) * self.cm.n)
                self.kept[mkey, p, q] = tuple(a + b for a, b in zip(before, kept))

    def _memory(self) -> None:
        """Σ_n bytes_r(n,c)·y[n,c] ≤ rank r's memory less the recomputed block's activations and
        the collective reserve. A rank whose largest choices fit gets no row (it cannot bind); ranks
        with the same capacity and coefficients (same device, slowdown and lengths) share one."""
        cm = self.cm
        # bytes per rank of each representative's candidates, summed over the tied members
        keys = [(name, c, v) for name, ms in self.members.items() for c, v in self.choices(name)]
        mem = np.array([[sum(per_rank) for per_rank in zip(*(cm.memory_bytes(self.graph[m], c)
                                                            for m in self.members[name]))]
                        for name, c, _ in keys], dtype=np.float64).reshape(len(keys), cm.n)
        caps = np.array([float(cm.cluster.memory_bytes(r)) - cm.activation_reserve[r] - cm.collective_reserve
                         for r in range(cm.n)])
        group = np.array([list(self.members).index(name) for name, _, _ in keys], dtype=np.int64)
        worst = np.zeros((len(self.members), cm.n))
        np.maximum.at(worst, group, mem)  # per representative, its largest choice on each rank
        kept = np.array([sum(b[r] for b in self.kept.values()) for r in range(cm.n)])  # weights saved whole, at most
        binding = [r for r in range(cm.n) if worst[:, r].sum() + kept[r] > caps[r]]
        if not binding:
            return
        moved = [(self.moves[key][0], b) for key, b in self.kept.items()]
        # ranks with the same capacity and coefficients (same device, slowdown and lengths) share one row
        table = np.vstack([mem[:, binding], caps[binding][None, :], kept[binding][None, :]]
                          + [np.array([b[r] for r in binding])[None, :] for _, b in moved])
        _, first = np.unique(table.T, axis=0, return_index=True)
        for i in sorted(first):
            r = binding[i]
            self.prob += (pulp.lpSum(float(b) * v for (_, _, v), b in zip(keys, mem[:, r]) if b)
                          + pulp.lpSum(b[r] * mv for mv, b in moved if b[r]) <= caps[r]), f"mem_{r}"

    def choice(self) -> dict[str, Candidate]:
        """Each node's candidate from the solution: the one its representative's y takes, by
        name among the node's own candidates (its first where it has none of that name)."""
        out = {}
        for node in self.graph:
            best = max(self.choices(node.name), key=lambda cv: cv[1].value() or 0.0)[0]
            own = {c.name: c for c in self.allowed[node.name]}
            out[node.name] = own.get(best.name, next(iter(own.values())))
        return out


def run_solver(prob: pulp.LpProblem, solver: Any) -> str:
    """Solve ``prob`` with what the solver library prints to stdout (from C, past
    ``sys.stdout``) captured, and return that text: it goes to the log at INFO, so
    ``hap-plan --json`` stays one JSON object."""
    with library_output() as printed:
        prob.solve(solver)
    if printed.text.strip():
        log.info("%s printed:\n%s", type(solver).__name__, printed.text.rstrip())
    return printed.text


def memory_report(graph: Graph, cm: CostModel, choice: dict[str, Candidate]) -> list[dict[str, float]]:
    """Per rank: bytes of parameters, gradients, optimizer state and activations, and the total."""
    out = [{"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0, "activations": 0.0} for _ in range(cm.n)]
    for node in graph:
        for part, per_rank in cm.memory_parts(node, choice[node.name]).items():
            for r, b in enumerate(per_rank):
                out[r][part] += b
    kept = kept_bytes(graph, cm, choice)  # weights gathered whole and saved for backward
    for row, peak, k in zip(out, cm.activation_reserve, kept):
        row["activations"] += peak + k  # a recomputed block's activations, the largest transient output
        row["total"] = sum(row.values())
    return out


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name)


# ---------------------------------------------------------------------------------------
# re-fitting the shares with placements fixed (HAP's ratio LP)
# ---------------------------------------------------------------------------------------
TRUST_REGION = 0.10  # refit with timed ops: shares within 10% of speed-proportional


def refit_shares(graph: Graph, cm: CostModel, choice: dict[str, Candidate], total: int) -> tuple[int, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _refit_shares(graph, cm, choice, total)


def _refit_shares(graph: Graph, cm: CostModel, choice: dict[str, Candidate], total: int) -> tuple[int, ...]:
    """HAP's ratio LP: the fraction x of every split dim per rank that minimises the sum over
    nodes of the slowest rank's affine time. Ranks of one class (``CostModel.rank_class``, where
    ops are not timed per rank) share one x: the LP is symmetric in them, so an optimum with
    equal x exists, and 512 identical ranks cost what one does."""
    n = cm.n
    timed = any(cm.cluster.profile(r).measure_ops for r in range(n))
    classes = list(range(n)) if timed else [cm.rank_class.index(c) for c in cm.rank_class]
    reps = sorted(set(classes))  # one representative rank per class
    count = {c: classes.count(c) for c in reps}
    prob = pulp.LpProblem("hap_ratios", pulp.LpMinimize)
    x = {c: pulp.LpVariable(f"x_{c}", 0, 1) for c in reps}
    prob += pulp.lpSum(count[c] * x[c] for c in reps) == 1
    if timed:
        # timed ops: a trust region of +-10% around the speed-proportional shares. The secants come
        # from single timings that scatter +-10-20% on a shared machine, so a larger move on their
        # word alone is noise, not a better plan
        speeds = [cm.cluster.speed(r, graph.precision) for r in range(n)]
        for r in range(n):
            p = speeds[r] / sum(speeds)
            prob += x[r] >= (1 - TRUST_REGION) * p
            prob += x[r] <= (1 + TRUST_REGION) * p
    obj = []
    for node in graph:
        c = choice[node.name]
        if node.kind != "op" or node.op_class == "view":
            continue
        t = cm.compute_s(node, c)
        if c.split is None:
            obj.append(max(t))
            continue
        tv = pulp.LpVariable(f"t_{_safe(node.name)}", 0)
        for r in reps:
            a, b = cm.affine_s(node, c, r)
            prob += tv >= a * x[r] + b
        obj.append(tv)
    prob += pulp.lpSum(obj)
    solver_text = run_solver(prob, pulp.HiGHS(msg=False, mip=False))
    if prob.sol_status != pulp.LpSolutionOptimal:
        log.warning("the share LP ended %s; keeping its last ratios. The solver printed:\n%s",
                    pulp.LpSolution.get(prob.sol_status, prob.sol_status), solver_text.rstrip())
    ratios = [max(x[classes[r]].value() or 0.0, 0.0) for r in range(n)]
    if sum(ratios) <= 0:
        return tuple(largest_remainder(total, [1.0] * n))
    return largest_remainder(total, ratios)


def lower_bound_s(graph: Graph, cm: CostModel) -> float:
    """All work spread perfectly over all ranks' rates, no communication, no kernel floors (where
    ops are timed on this machine, the whole op's time is its work)."""
    total = 0.0
    for node in graph:
        if node.kind != "op" or node.op_class in ("view",):
            continue
        works = [cm.whole_s(node, r) for r in range(cm.n)]
        rates = [1.0 / w for w in works if w > 0]
        if rates:
            total += 1.0 / sum(rates)
    return total


def speed_shares(cluster: Cluster, total: int, precision: str = "fp32") -> tuple[int, ...]:
    """Shares of ``total`` proportional to each rank's matmul rate in ``precision``."""
    return largest_remainder(total, [cluster.speed(r, precision) for r in range(cluster.num_ranks)])


def even_shares(n: int, total: int) -> tuple[int, ...]:
    return tuple(total // n + (1 if r < total % n else 0) for r in range(n))

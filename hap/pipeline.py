"""Pipeline stages: the plan for clusters whose network binds.

A pipelined plan cuts the captured graph at its blocks into stages (``hap.stages``) and gives
each stage a group of ranks, whole nodes where the cluster has enough of them. Each stage gets
its own SPMD plan from the single-stage search (uneven shares of every micro-batch, per-op
sharding, its own gradient all-reduce, inside its nodes). Between stages only each cut's
activations travel forward and their gradients backward, per micro-batch.

The schedule is 1F1B, 1F1B with a longer warm-up, or GPipe (``hap.runtime.pipeline.stage_order``),
each forward run once and its activations kept for its backward: 1F1B keeps at most (stages - s)
micro-batches on stage s, a warm-up longer by w that many more, GPipe the whole batch but never
waits on a round trip through the later stages while micro-batches are left to send. Each
stage's plan is solved at the whole batch (its search may split it into micro-batches, or
recompute blocks, to fit); ``price`` then keeps the counts and schedules under which every rank
holds the micro-batches its stage keeps in flight (``scheduled_memory``), the faster, the one
that keeps fewer on a tie. Stage s's ranks are the data of its plan's cost model; the
schedule's timeline is priced by ``schedule_s``, event by event.

Where to cut: block ranges balance each stage's work against its ranks' summed speed (a DP
over cuts, as Alpa and Metis do); which ranks: contiguous nodes (or ranks, where there are
fewer nodes than stages) in the cluster's order, every split tried, each priced and the fastest
kept. A stage solve is cached by (blocks, ranks).
"""
from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Sequence

from hap.cluster import Cluster, RankInfo, ranks_text
from hap.cost import CostSetup
from hap.errors import InfeasiblePlan
from hap.graph import Graph
from hap.plan import Plan, Prediction, Schedule, Stage
from hap.runtime.pipeline import in_flight, micro_rows, overlaps, stage_order
from hap.search import grad_sync_notes, micro_batch_notes
from hap.solve import evaluate, grad_sync_schedule
from hap.stages import StageGraph, cut_candidates, shared_in, shared_params, shared_weights, split

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)  # pipeline depths the search tries, each at most the global batch
# 1F1B's extra warm-ups the search tries (stage_order): each keeps that many more micro-batches in
# flight, so a slow cut's round trip can run under later forwards; fewer than GPipe's m
WARMUPS = (0, 1, 2, 4, 8, 16)
FORWARD_SHARE = 1 / 3  # a forward's share of forward + backward (backward ~ 2x forward for matmuls)
MAX_GROUPINGS = 4  # rank groupings priced per stage count (the most balanced by speed first)
EVERY_SPLIT = 100_000  # up to this many ways to split the nodes into stages, every one is scored


def sub_cluster(cluster: Cluster, ranks: Sequence[int], index: int) -> Cluster:
    """``ranks`` of ``cluster`` as a cluster of their own: numbered from 0, nodes renumbered in order."""
    nodes = {n: i for i, n in enumerate(dict.fromkeys(cluster.ranks[r].node for r in ranks))}
    infos = tuple(RankInfo(i, cluster.ranks[r].device, nodes[cluster.ranks[r].node], cluster.ranks[r].slowdown)
                  for i, r in enumerate(ranks))
    return dataclasses.replace(cluster, name=f"{cluster.name} stage {index}", ranks=infos,
                               devices={k: v for k, v in cluster.devices.items()
                                        if any(i.device == k for i in infos)})


def groupings(cluster: Cluster, stages: int) -> list[tuple[tuple[int, ...], ...]]:
    """Ways to give ``stages`` stages contiguous groups of ranks: whole nodes where the cluster
    has at least as many nodes, else single ranks; the ``MAX_GROUPINGS`` most even by speed
    (the fastest group's summed speed over the slowest's), most even first. Every split is
    scored where there are at most ``EVERY_SPLIT`` of them; beyond that (64 nodes into 6
    stages is 7 million splits), only those that put each boundary within a unit of where the
    summed speed reaches its even share."""
    units = cluster.nodes() if cluster.num_nodes >= stages else [[r] for r in range(cluster.num_ranks)]
    if stages > len(units):
        return []
    speed = [sum(cluster.speed(r) for r in u) for u in units]
    prefix = [0.0, *itertools.accumulate(speed)]
    n = len(units)
    if math.comb(n - 1, stages - 1) <= EVERY_SPLIT:
        splits = itertools.combinations(range(1, n), stages - 1)
    else:
        even = [bisect.bisect_left(prefix, prefix[-1] * i / stages) for i in range(1, stages)]
        near = [sorted({max(1, min(n - 1, e + d)) for d in (-1, 0, 1)}) for e in even]
        splits = (c for c in itertools.product(*near) if all(a < b for a, b in zip(c, c[1:])))

    def unevenness(cuts: tuple[int, ...]) -> float:
        sums = [prefix[b] - prefix[a] for a, b in zip((0, *cuts), (*cuts, n))]
        return max(sums) / min(sums)

    best = heapq.nsmallest(MAX_GROUPINGS, splits, key=unevenness)
    return [tuple(tuple(r for u in units[a:b] for r in u) for a, b in zip((0, *cuts), (*cuts, n))) for cuts in best]


def block_work(graph: Graph, cuts: Sequence[int]) -> list[float]:
    """FLOPs of the graph's ops between consecutive cut candidates (the prologue with the first
    block, the epilogue with the last)."""
    bounds = (0, *cuts, len(graph.nodes))
    return [sum(n.flops for n in graph.nodes[a:b] if n.kind == "op") for a, b in zip(bounds, bounds[1:])]


def balanced_cuts(graph: Graph, speeds: Sequence[float]) -> list[int]:
    """The cut candidates that split the graph into ``len(speeds)`` contiguous parts minimising
    the slowest part's work over its stage's speed (a DP over cuts)."""
    cands = cut_candidates(graph)
    work = block_work(graph, cands)
    n, k = len(work), len(speeds)
    if k > n:
        raise InfeasiblePlan(f"{k} stages need at least {k} blocks to cut between; the model has {n} "
                             "(Graph.blocks); plan fewer stages")
    prefix = [0.0, *itertools.accumulate(work)]
    best = [[math.inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            for i in range(s - 1, j):
                t = max(best[s - 1][i], (prefix[j] - prefix[i]) / speeds[s - 1])
                if t < best[s][j]:
                    best[s][j], back[s][j] = t, i
    ends, j = [], n
    for s in range(k, 0, -1):
        ends.append(j)
        j = back[s][j]
    ends.reverse()
    return [cands[e - 1] for e in ends[:-1]]


def schedule_s(forward_s: Sequence[float], backward_s: Sequence[float], cut_s: Sequence[float], m: int,
               events: list[tuple[int, str, int, float, float]] | None = None, schedule: str = "1f1b",
               transfers: list[tuple[int, str, int, float, float]] | None = None, warmup: int = 0) -> list[float]:
    """When the last micro-batch's backward ends on every stage, each stage running its
    micro-batches in the program's order (``hap.runtime.pipeline.stage_order``): ``F`` of
    micro-batch j (``forward_s[s]``) once its activations arrive, ``B`` (``backward_s[s]``; on
    the last stage forward and backward at once) once its gradients arrive. ``cut_s[s]``: how
    long one micro-batch's transfer over cut s (between stage s and s+1) keeps the links busy,
    each way. A transfer starts once what it carries is computed and both the sending stage's
    links and the receiving stage's are free: a stage's sends forward and back leave through the
    same node links, and what it receives from both sides arrives through them. Transfers take
    the links in the order they become ready, so events are played in time order. Returns each
    stage's end; each ``F`` and ``B`` is added to ``events`` as (stage, "F" or "B", micro-batch,
    start, end), each transfer to ``transfers`` as (sending stage, "F" forward or "B" backward,
    micro-batch, start, end)."""
    k = len(backward_s)
    order = [stage_order(schedule, s, k, m, warmup) for s in range(k)]
    arrive: dict[tuple[int, str, int], float] = {}  # (receiving stage, kind, micro-batch): when it has its input
    free, at = [0.0] * k, [0] * k
    out_free, in_free = [0.0] * k, [0.0] * k  # when each stage's links are done sending, receiving
    ready: list[tuple[float, int, int, str, int]] = []  # transfers computed, not yet sent: (ready, from, to, kind, j)

    def next_start(s: int) -> float:
        """When stage s can start its next step (inf: done, or its input has not arrived)."""
        if at[s] == len(order[s]):
            return math.inf
        kind, j = order[s][at[s]]
        need = "F" if kind == "F" or s == k - 1 else "B"
        if s == 0 and need == "F":
            return free[s]
        return max(free[s], arrive[(s, need, j)]) if (s, need, j) in arrive else math.inf

    while True:
        starts = [next_start(s) for s in range(k)]
        s = min(range(k), key=starts.__getitem__)
        if ready and ready[0][0] <= starts[s]:  # a transfer ready before any step can start goes first
            t, a, b, kind, j = heapq.heappop(ready)
            seconds = cut_s[min(a, b)]
            start = max(t, out_free[a], in_free[b])
            out_free[a] = in_free[b] = arrive[(b, kind, j)] = start + seconds
            if transfers is not None and seconds > 0:
                transfers.append((a, kind, j, start, start + seconds))
            continue
        if starts[s] == math.inf:
            break
        kind, j = order[s][at[s]]
        start = starts[s]
        free[s] = start + (forward_s[s] if kind == "F" else backward_s[s])
        if events is not None:
            events.append((s, kind, j, start, free[s]))
        if s < k - 1 and kind == "F":  # the activations on to the next stage
            heapq.heappush(ready, (free[s], s, s + 1, "F", j))
        if s > 0 and kind == "B":  # the inputs' gradients back
            heapq.heappush(ready, (free[s], s, s - 1, "B", j))
        at[s] += 1
    return free


def cut_seconds(cluster: Cluster, a: Sequence[int], b: Sequence[int], shares_a: Sequence[int],
                shares_b: Sequence[int], nbytes: float) -> float:
    """How long one micro-batch's activations (``nbytes``, all its rows) keep the links of a cut
    from stage ranks ``a`` (holding rows by ``shares_a``) to ``b`` busy: each sender sends each
    receiver their common rows at once (``hap.runtime.pipeline.overlaps``, as the program does);
    between nodes every node's rows leave and arrive through its one network link, so the busiest
    node link sets the time; within a node, each rank's own link."""
    if not nbytes:
        return 0.0
    total = sum(shares_a)
    node_out: dict[int, float] = {}
    node_in: dict[int, float] = {}
    rank_io: dict[int, float] = {}
    for i, k, _, _, cnt in overlaps(shares_a, shares_b):
        ra, rb, part = a[i], b[k], nbytes * cnt / total
        na, nb = cluster.ranks[ra].node, cluster.ranks[rb].node
        if na == nb:
            rank_io[ra] = rank_io.get(ra, 0.0) + part
            rank_io[rb] = rank_io.get(rb, 0.0) + part
        else:
            node_out[na] = node_out.get(na, 0.0) + part
            node_in[nb] = node_in.get(nb, 0.0) + part
    times = [0.0]
    if node_out:
        link = cluster.group_link([*a, *b])
        times.append(link.alpha_s + max([*node_out.values(), *node_in.values()]) / link.bytes_per_s)
    for r, part in rank_io.items():
        link = cluster.intra_link(cluster.ranks[r].device)
        times.append(link.alpha_s + part / link.bytes_per_s)
    return max(times)


@dataclasses.dataclass
class Priced:
    step_s: float
    schedule: Schedule


def price(stage_plans: Sequence[Plan], stages: Sequence[StageGraph], groups: Sequence[Sequence[int]],
          cluster: Cluster, fixed_m: int | None = None, memo: dict | None = None) -> Priced | None:
    """The pipelined step: the schedule's span at the best micro-batch count, then each stage's
    gradient all-reduce (less the weights several stages hold: ``stage_sync``) and optimizer
    step, and on the stages holding shared weights their all-reduce over all of them
    (``tied_seconds``). Per micro-batch, a stage's forward + backward is its plan's, priced again with every
    rank running ``m`` micro-batches (each op timed at a micro-batch's shape, each launch and
    per-micro-batch collective paid m times: ``CostModel``'s micro-batches), less the gradient
    all-reduce and optimizer step, over ``m``. Small micro-batches run a core or a GPU below its
    whole-batch rate, which a split of the whole-batch time would miss. A schedule is priced only
    where every rank holds the activations it keeps in flight (``scheduled_memory``); None where
    no count and schedule fits."""
    k = len(stage_plans)
    batch = stage_plans[0].global_batch
    memo = {} if memo is None else memo  # (id of a stage plan, m): its work per micro-batch; its own sync
    shared = set(shared_params(stages))
    after = [stage_sync(p, shared, memo)[1] + p.predicted.optimizer_s for p in stage_plans]
    tied_s = tied_seconds(cluster, stages, groups)
    tied_stages = tuple(sorted({s for where in shared_weights([st.graph for st in stages]).values() for s in where}))
    whole = [p.predicted.step_s - p.predicted.grad_sync_s - p.predicted.optimizer_s for p in stage_plans]

    sent = cut_bytes(stage_plans, stages)

    def best_of(m: int, work: Sequence[float], check_memory: bool = True) -> Priced | None:
        fwd = [w * FORWARD_SHARE for w in work[:-1]] + [0.0]  # the last stage: forward and backward at once (B)
        back = [w - f for w, f in zip(work, fwd)]
        cut = [cut_seconds(cluster, groups[s], groups[s + 1], stage_plans[s].shares, stage_plans[s + 1].shares,
                           sent[s] / m) for s in range(k - 1)]
        busy = sum(work) * m / k
        out = None
        # in the order of the activations they keep, so the one that keeps fewer wins a tie
        for name, warmup in [("1f1b", w) for w in WARMUPS if w == 0 or k - 1 + w < m] + [("gpipe", 0)]:
            if check_memory and not all(fits(p, scheduled_memory(p, m, in_flight(name, s, k, m, warmup), memo))
                                        for s, p in enumerate(stage_plans)):
                continue
            ends = schedule_s(fwd, back, cut, m, schedule=name, warmup=warmup)
            sch = Schedule(m, tuple(fwd), tuple(back), tuple(cut), tuple(after), tied_s,
                           max(0.0, 1 - busy / max(ends)), name, tied_stages, warmup)
            if out is None or sch.step_s(ends) < out.step_s - 1e-12:
                out = Priced(sch.step_s(ends), sch)
        return out

    # the whole batch's work split m ways is a lower bound (micro-batches only add to it):
    # counts are priced in the order of that bound, and one that cannot win is not timed
    counts = [fixed_m] if fixed_m else [m for m in MICRO_BATCHES if m <= batch]
    bounds = {m: best_of(m, [w / m for w in whole], check_memory=False).step_s for m in counts}
    best = None
    for m in sorted(counts, key=lambda m: bounds[m]):
        if best is not None and bounds[m] >= best.step_s:
            continue
        cand = best_of(m, [micro_batch_run(p, m, memo).work_s for p in stage_plans])
        if cand is not None and (best is None or cand.step_s < best.step_s - 1e-12):
            best = cand
    return best


@dataclasses.dataclass(frozen=True)
class MicroBatchRun:
    """A stage plan run as ``m`` micro-batches: its forward + backward per micro-batch (less its
    gradient all-reduce and optimizer step), and per rank its memory without the activations
    that follow the batch and the bytes of those activations per sample (row) it keeps."""
    work_s: float
    fixed_bytes: tuple[float, ...]
    row_bytes: tuple[float, ...]


def micro_batch_run(plan: Plan, m: int, memo: dict) -> MicroBatchRun:
    key = (id(plan), m)
    if key not in memo:
        setup = dataclasses.replace(CostSetup.of_plan(plan), micro_batches=(m,) * plan.num_ranks)
        cm, choice = setup.cost_model(plan.graph, plan.cluster), plan.choice()
        ev = evaluate(plan.graph, cm, choice)
        # the cost model keeps a rank's largest micro-batch of these: micro_scale of its share
        kept = [sum(x) for x in zip(*(cm.batch_activations(node, choice[node.name]) for node in plan.graph))]
        kept = kept or [0.0] * plan.num_ranks
        rows = [cm.micro_scale[r] * share for r, share in enumerate(plan.shares)]
        memo[key] = MicroBatchRun((ev.step_s - ev.grad_sync_s - ev.optimizer_s) / m,
                                  tuple(b - a for b, a in zip(ev.memory_bytes, kept)),
                                  tuple(a / n if n else 0.0 for a, n in zip(kept, rows)))
    return memo[key]


def scheduled_memory(plan: Plan, m: int, kept: int, memo: dict) -> tuple[float, ...]:
    """Per rank, a stage plan's memory where its schedule keeps ``kept`` consecutive micro-batches'
    activations of ``m`` at once (``hap.runtime.pipeline.in_flight``): those of the fullest such
    window of its rows (``micro_rows``)."""
    run = micro_batch_run(plan, m, memo)
    rows = micro_rows(plan.shares, m)
    out = []
    for r, (fixed, per_row) in enumerate(zip(run.fixed_bytes, run.row_bytes)):
        mine = [row[r] for row in rows]
        out.append(fixed + per_row * max(sum(mine[i:i + kept]) for i in range(m - kept + 1)))
    return tuple(out)


def fits(plan: Plan, memory: Sequence[float]) -> bool:
    return all(b <= plan.cluster.memory_bytes(r) for r, b in enumerate(memory))


AFTER_LAST = "a stage's gradients are complete only once its last micro-batch's backward has run"


def stage_sync(plan: Plan, shared: set[str], memo: dict) -> tuple[list[list[str]], float]:
    """A stage's own gradient all-reduce, its buckets and time: its plan's, after backward
    (``AFTER_LAST``: overlapping the last micro-batch's backward alone would gain little), and
    without the weights other stages hold too (state-dict keys ``shared``), which the program
    sums over all their holders at once (``hap.runtime.pipelined.StageTrainer.sum_shared``)."""
    key = (id(plan), "sync")
    if key not in memo:
        tied = shared_in(plan.graph, shared)
        synced = [n for n in plan.grad_synced if n not in tied]
        if len(synced) == len(plan.grad_synced) and not plan.predicted.grad_overlap:
            memo[key] = [list(b) for b in plan.predicted.grad_buckets], plan.predicted.grad_sync_s
        else:
            cm = CostSetup.of_plan(plan).cost_model(plan.graph, plan.cluster)
            memo[key] = grad_sync_schedule(plan.graph, cm, plan.choice(), synced, overlap=False)
    return memo[key]


def staged(plan: Plan, shared: set[str], memo: dict) -> Plan:
    """A stage's plan as its stage runs it: its gradient buckets, all-reduce time and notes as
    ``stage_sync`` has them. Its ``grad_synced`` keeps the shared weights: their gradients are
    still partial sums on its ranks, summed over the holders."""
    pr = plan.predicted
    buckets, sync_s = stage_sync(plan, shared, memo)
    if not pr.grad_overlap and sync_s == pr.grad_sync_s and [list(b) for b in pr.grad_buckets] == buckets:
        return plan
    kinds = [m.kind for m in plan.moves]
    was = grad_sync_notes(plan.graph, plan.cluster, plan.num_ranks, pr.grad_buckets, pr.grad_overlap,
                          pr.grad_sync_s, kinds)
    now = grad_sync_notes(plan.graph, plan.cluster, plan.num_ranks, buckets, False, sync_s, kinds, AFTER_LAST)
    notes = [x for n in plan.notes for x in (now if n in was[:1] else [] if n in was else [n])]
    predicted = dataclasses.replace(pr, step_s=pr.step_s - pr.grad_sync_s + sync_s, grad_sync_s=sync_s,
                                    grad_buckets=tuple(tuple(b) for b in buckets), grad_overlap=False)
    return dataclasses.replace(plan, predicted=predicted, notes=tuple(notes))


def in_schedule(plan: Plan, sch: Schedule, s: int, kept: int, memory: Sequence[float]) -> Plan:
    """Stage ``s``'s plan as the schedule runs it: every rank's share in the pipeline's
    micro-batches, and the memory with the ``kept`` micro-batches its schedule keeps in flight,
    in place of the micro-batches its own search chose to fit the whole batch (and their notes)."""
    m, k = sch.micro_batches, len(sch.backward_s)
    own = micro_batch_notes(plan.cluster, plan.shares, plan.micro_batches) if plan.micro_batches else []
    fullest = max(range(plan.num_ranks), key=lambda r: memory[r] / plan.cluster.memory_bytes(r))
    if s == k - 1:
        held = "the last stage keeps one micro-batch's activations at a time, running its forward and backward together"
    elif kept == m:
        held = f"{sch.shown} keeps all {m} micro-batches' activations until their backward"
    else:
        held = f"{sch.shown} keeps at most {kept} of the {m} micro-batches' activations at once"
    cap = plan.cluster.memory_bytes(fullest)
    note = (f"{held}: {memory[fullest] / 1e9:.3g} of {cap / 1e9:.3g} GB ({memory[fullest] / cap:.0%}) on its "
            f"fullest rank ({plan.cluster.ranks[fullest].device})")
    predicted = dataclasses.replace(plan.predicted, memory_bytes=tuple(int(b) for b in memory))
    return dataclasses.replace(plan, micro_batches=(m,) * plan.num_ranks if m > 1 else (), predicted=predicted,
                               notes=tuple(x for x in plan.notes if x not in own) + (note,))


def node_bytes(stage: StageGraph, keys: Sequence[str]) -> int:
    """The bytes of the stage's parameter known by the state-dict keys ``keys``."""
    return next(n for n in stage.graph.params() if tuple(n.aliases or [n.target]) == tuple(keys)).out.nbytes


def tied_seconds(cluster: Cluster, stages: Sequence[StageGraph], groups: Sequence[Sequence[int]]) -> float:
    """The all-reduce that sums a weight's gradients over the stages that hold it (a tied
    embedding and LM head): one over all the ranks of those stages, each adding its own part."""
    total = 0.0
    for keys, where in shared_weights([st.graph for st in stages]).items():
        link = cluster.group_link([r for s in where for r in groups[s]])
        total += 2 * link.alpha_s + 2 * node_bytes(stages[where[0]], keys) / link.bytes_per_s
    return total


def stage_pins(sg: StageGraph, shared: set[str], width: int) -> dict[str, str]:
    """What a stage's plan of ``width`` ranks must hold fixed: its received and sent activations
    and their gradients sharded by samples (the cut hands each rank its rows), its weights held
    by other stages too replicated (their gradients are summed across stages whole). One rank
    holds everything whole, its rows included."""
    if width == 1:
        return {}
    pins = {x: "S(0)" for x in (*sg.receives, *sg.sends, *sg.grads)}
    return {**pins, **{name: "R" for name in shared_in(sg.graph, shared)}}


def plan_pipeline(graph: Graph, cluster: Cluster, stages: int, solve: Callable[[Graph, Cluster, dict], Plan],
                  say: Callable[[str], None], micro_batches: int | None = None) -> Plan | None:
    """The fastest pipelined plan of ``stages`` stages (None where the cluster or model cannot
    have that many). ``solve(stage_graph, stage_cluster, pins)`` is the single-stage search."""
    cache: dict[tuple, Plan] = {}
    memo: dict = {}  # price's work per micro-batch of each cached stage plan
    best: tuple[Priced, list[Plan], list[StageGraph], tuple] | None = None
    tried = False
    for groups in groupings(cluster, stages):
        speeds = [sum(cluster.speed(r, graph.precision) for r in g) for g in groups]
        try:
            cuts = balanced_cuts(graph, speeds)
        except InfeasiblePlan:
            return None
        parts = split(graph, cuts)
        shared = set(shared_params(parts))
        plans = []
        for sg, g in zip(parts, groups):
            key = (sg.blocks, tuple(g))
            if key not in cache:
                say(f"solving stage {sg.index} ({blocks_text(sg.blocks)}) on ranks {ranks_text(g)}")
                cache[key] = solve(sg.graph, sub_cluster(cluster, g, sg.index), stage_pins(sg, shared, len(g)))
            plans.append(cache[key])
        priced = price(plans, parts, groups, cluster, micro_batches, memo)
        tried = True
        if priced is not None and (best is None or priced.step_s < best[0].step_s):
            best = (priced, plans, parts, groups)
    if best is None and tried:
        counts = f"{micro_batches}" if micro_batches else f"up to {max(MICRO_BATCHES)}"
        raise InfeasiblePlan(
            f"--stages {stages}: under no schedule (1F1B, with warm-ups up to +{max(WARMUPS)}, or GPipe) and "
            f"micro-batch count ({counts}) does every "
            "rank hold the activations its stage keeps in flight; plan fewer stages (--stages 1 keeps one), "
            "a smaller global batch (--batch-size), or --recompute all")
    if best is None:
        return None
    priced, plans, parts, groups = best
    return assemble(graph, cluster, priced, plans, parts, groups, memo)


def assemble(graph: Graph, cluster: Cluster, priced: Priced, plans: Sequence[Plan], parts: Sequence[StageGraph],
             groups: Sequence[Sequence[int]], memo: dict) -> Plan:
    """The pipelined Plan: every rank's share in its stage, every node's choice from the stage
    that runs it, each stage's plan as it runs (``staged``), and the schedule's prediction."""
    n = cluster.num_ranks
    shared = shared_weights([st.graph for st in parts])
    sch, keys = priced.schedule, set(shared_params(parts))
    kept = [in_flight(sch.name, s, len(plans), sch.micro_batches, sch.warmup) for s in range(len(plans))]
    plans = [in_schedule(staged(p, keys, memo), sch, s, kept[s], scheduled_memory(p, sch.micro_batches, kept[s], memo))
             for s, p in enumerate(plans)]
    shares, compute, memory = [0] * n, [0.0] * n, [0] * n
    for p, g in zip(plans, groups):
        for i, r in enumerate(g):
            shares[r], compute[r], memory[r] = p.shares[i], p.predicted.compute_s[i], p.predicted.memory_bytes[i]
    nodes = {}
    for p in plans:
        for name, choice in p.nodes.items():
            if name in graph and name not in nodes:
                nodes[name] = choice
    stages = tuple(Stage(tuple(g), sg.blocks, p, sg.inputs, sg.receives, sg.sends)
                   for p, sg, g in zip(plans, parts, groups))
    first = plans[0]
    optimizer = max(p.predicted.optimizer_s for p in plans)
    # the slowest stage's own all-reduce, and the shared weights' one where a stage holds any
    grad_sync = max(a - p.predicted.optimizer_s for a, p in zip(sch.after_s, plans)) + \
        (sch.tied_s if sch.tied_stages else 0.0)
    predicted = Prediction(priced.step_s, tuple(compute), priced.step_s - grad_sync, 0.0, grad_sync, tuple(memory),
                           (), False, optimizer, 0.0)
    return Plan(graph, cluster, tuple(shares), nodes, tuple(m for p in plans for m in p.moves),
                tuple(x for p in plans for x in p.grad_synced), predicted, {}, 0.0,
                sum(p.solve_s for p in plans), first.solver_status, first.optimizer, "hap_pipeline", first.spec,
                tuple(w for p in plans for w in p.warnings),
                (f"pipeline: {sch.summary(len(plans))}: " + "; ".join(
                     f"stage {i} on ranks {ranks_text(g)} runs {blocks_text(sg.blocks)}"
                     for i, (sg, g) in enumerate(zip(parts, groups))),
                 *cut_notes(plans, parts, sch),
                 *(f"{' / '.join(keys)} ({node_bytes(parts[where[0]], keys) / 2**20:.1f} MiB), which stages "
                   f"{' and '.join(map(str, where))} hold, is left out of their own gradient all-reduces and summed "
                   f"over all their ranks in one all-reduce once those are done ({sch.tied_s * 1e3:.1f} ms for all "
                   "such weights)" for keys, where in shared.items())),
                (priced.schedule.micro_batches,) * n, (), (), stages, priced.schedule)


def cut_bytes(plans: Sequence[Plan], parts: Sequence[StageGraph]) -> list[int]:
    """The bytes of activations each cut hands on a step (the whole batch), as many again back."""
    return [sum(plans[s].graph[x].out.nbytes for x in parts[s].sends) for s in range(len(parts) - 1)]


def cut_notes(plans: Sequence[Plan], parts: Sequence[StageGraph], sch: Schedule) -> list[str]:
    """Per cut, what it moves a step and how long that keeps the busiest link it crosses (a node's
    network link, or within a node a rank's) busy, each way, against the less busy of the two
    stages' compute: where the link time is the larger, the cut binds the schedule."""
    notes = []
    m = sch.micro_batches
    for s, nbytes in enumerate(cut_bytes(plans, parts)):
        link_s = m * sch.cut_s[s]
        busy_s = m * min(sch.forward_s[s] + sch.backward_s[s], sch.forward_s[s + 1] + sch.backward_s[s + 1])
        verdict = ("the cut binds: stages of more nodes would spread it over more links" if link_s > busy_s
                   else "hidden under that compute")
        notes.append(f"the cut between stages {s} and {s + 1} moves {nbytes / 1e6:.1f} MB of activations a step "
                     f"forward and their gradients back, keeping the busiest link that carries it "
                     f"{link_s * 1e3:.1f} ms a step each way, against {busy_s * 1e3:.1f} ms of compute on the less "
                     f"busy of the two stages: {verdict}")
    return notes


def blocks_text(blocks: Sequence[str]) -> str:
    """A stage's blocks: the first and the last."""
    if not blocks:
        return "no block"
    return blocks[0] if len(blocks) == 1 else f"{blocks[0]}..{blocks[-1]}"


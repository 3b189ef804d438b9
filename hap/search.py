"""The search: which share vectors and pins are solved, and which result becomes the plan.

Each attempt is one MILP (``hap.solve.solve_placements``) over the candidates that its
share vector allows, priced under one ``hap.cost.CostSetup``:

    dp_even, dp_proportional   the data-parallel baselines (``DATA_PARALLEL``)
    hap                        free placements, shares proportional to device speed
    hap_refit0..2              free placements, shares re-fitted to the timed work of the last
                               hap result (kept only while the step gets faster)
    hap_even                   free placements, even shares
    hap_mid0..1                where hap_even is faster than the speed-fitted shares (their
                               compute no longer hides the collectives), shares halfway
                               between the two best so far
    hap_dp_refit               data parallel, shares re-fitted to dp_proportional's timed work

Where an attempt's memory overfills a rank, it is solved again with the largest buffer of
its collectives kept free, and where activations overfill, under the memory levers: the
fastest of micro-batches, recomputed blocks, or both (``Search.fit_memory``). The baselines
(``hap.baselines``) are attempts of the same kind.

The plan keeps the simplest result within 1% of the fastest (``PREFERENCE``), and never
one slower than a feasible data-parallel baseline. A user's pins bind every hap attempt;
the baselines are then only for comparison.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hap.calibrate import resolve
from hap.cluster import Cluster, ranks_text
from hap.cost import CostModel, CostSetup, weight_gather
from hap.errors import HapError, InfeasiblePlan, PinError
from hap.graph import Graph, Node
from hap.placement import Placement, Splitter
from hap.plan import BaselineResult, NodeChoice, Plan, PlannedMove, Prediction
from hap.precision import choose as choose_precision
from hap.precision import training_graph
from hap.rules import Candidate, RuleContext, has_rule, view_units
from hap.rules.token_wise import EXPERTS, ROWS, expert_parallel_calls, token_wise_candidates
from hap.runtime.shares import largest_remainder
from hap.solve import (
    Evaluation,
    all_candidates,
    collective_temporary,
    evaluate,
    even_shares,
    lower_bound_s,
    memory_report,
    overlap_blocker,
    refit_shares,
    solve_placements,
    speed_shares,
)

log = logging.getLogger(__name__)

Pin = Callable[[Node, Candidate, list[Candidate]], bool]
REFIT_ROUNDS = 3
PREFER_WITHIN = 1.01  # a simpler result is kept unless another is at least 1% faster
FILLS = (0.9, 0.7, 0.5)  # fractions of each rank's memory the memory levers size the least-memory plan to
# a memory lever whose result is this much slower than another's in one attempt is not tried
# in the attempts after it (their shares are the first's, re-fitted)
LEVER_LOSES = 1.25
PREFERENCE = ("hap", "dp_proportional", "hap_refit*", "hap_dp_refit", "hap_even", "hap_mid*", "hap_experts",
              "dp_even")  # simplest first
MID_ROUNDS = 2


def batch_sharded(node: Node, c: Candidate, cands: list[Candidate]) -> bool:
    """An input's pin where the batch is sharded: its S candidate, if it has one."""
    return c.output.kind == "S" or len(cands) == 1


def dp_pin(node: Node, c: Candidate, cands: list[Candidate]) -> bool:
    if node.kind == "param":
        return c.output.kind == "R"
    if node.kind == "input":
        return batch_sharded(node, c, cands)
    return True


# the data-parallel baselines, solved in every search: (how their shares are set, their pin);
# ``hap.baselines.SETUPS`` holds them with the other baselines
DATA_PARALLEL: dict[str, tuple[str, Pin]] = {"dp_even": ("even", dp_pin), "dp_proportional": ("speed", dp_pin)}


def shares_by(how: str, cluster: Cluster, total: int, precision: str = "fp32") -> tuple[int, ...]:
    """The shares of a global batch of ``total``: "even", or by device "speed" (in ``precision``)."""
    return even_shares(cluster.num_ranks, total) if how == "even" else speed_shares(cluster, total, precision)


def global_batch(graph: Graph, n: int) -> int:
    """The graph's global batch (``Graph.global_batch``), ``n`` where it has no batch input."""
    found = graph.global_batch()
    return n if found is None else found


@dataclass(frozen=True)
class Attempt:
    name: str
    shares: tuple[int, ...]
    pin: Pin | None  # restricts each node's candidates; None: free placements
    experts: bool = False  # token-wise experts calls shard their experts (else they run on each rank's rows)
    # ranks may recompute different numbers of blocks (hap's lever; the systems a baseline
    # stands for recompute alike everywhere)
    per_rank_recompute: bool = True


@dataclass(frozen=True)
class Result:
    attempt: Attempt
    setup: CostSetup  # what it was solved and evaluated under (shares, micro-batches, recomputed blocks)
    choice: dict[str, Candidate]
    evaluation: Evaluation
    status: str

    @property
    def step_s(self) -> float:
        return self.evaluation.step_s


class Search:
    """Solves attempts on one graph and cluster; every share vector over its own candidates
    (no zero-length shard of a weight or feature dim), the ones emit finds again from the plan."""

    def __init__(self, graph: Graph, cluster: Cluster, *, optimizer: str, strict: bool, time_limit_s: float,
                 user_pins: dict[str, Placement], recompute: str = "auto", experts: str = "auto"):
        if recompute not in ("auto", "all", "none"):
            raise HapError(f"recompute={recompute!r}: give auto, all or none")
        self.graph, self.cluster, self.optimizer = graph, cluster, optimizer
        self.recompute = recompute  # auto: blocks recomputed only where memory is tight; all; none
        self.experts = experts  # auto: experts sharded where faster; shard: always (the user's choice); whole: never
        self.all_blocks = tuple(graph.blocks()) if recompute == "all" else ()
        self.strict, self.time_limit_s, self.user_pins = strict, time_limit_s, user_pins
        self.units = view_units(graph)
        self._cands: dict[tuple[int, ...], dict[str, list[Candidate]]] = {}
        self.results: dict[str, Result] = {}
        self.infeasible: dict[str, str] = {}
        self.losing_levers: set[str] = set()  # lever_kind()s that lost by LEVER_LOSES in a hap attempt

    def candidates(self, shares: tuple[int, ...]) -> dict[str, list[Candidate]]:
        if shares not in self._cands:
            ctx = RuleContext(self.graph, Splitter(shares), self.units)
            self._cands[shares] = all_candidates(self.graph, ctx, strict=self.strict)
        return self._cands[shares]

    def setup(self, shares: tuple[int, ...]) -> CostSetup:
        """An attempt's setup before any memory lever (with recompute "all": every block recomputed)."""
        return CostSetup(shares, self.optimizer, recompute=self.all_blocks)

    def cost_model(self, setup: CostSetup) -> CostModel:
        return setup.cost_model(self.graph, self.cluster)

    def restriction(self, attempt: Attempt) -> Callable[[Node, Candidate], bool] | None:
        """``attempt``'s pin over the candidates of its shares; None: free placements. The ops of a
        token-wise call take one mode together: ``experts`` in an experts attempt, else ``rows``."""
        own, pin = self.candidates(attempt.shares), attempt.pin
        mode = EXPERTS if attempt.experts else ROWS
        if not any(n.token_wise for n in self.graph.ops()):
            return None if pin is None else (lambda node, c: pin(node, c, own[node.name]))

        def allowed(node: Node, c: Candidate) -> bool:
            if node.token_wise and c.name in (ROWS, EXPERTS) and c.name != mode:
                return False
            return pin is None or pin(node, c, own[node.name])

        return allowed

    def user_pin(self, node: Node, c: Candidate, _cands: list[Candidate]) -> bool:
        return node.name not in self.user_pins or c.output == self.user_pins[node.name]

    def hap(self, name: str, shares: tuple[int, ...]) -> Attempt:
        return Attempt(name, shares, self.user_pin, experts=self.experts == "shard")

    def solve(self, attempt: Attempt) -> Result | None:
        """Solve ``attempt`` and keep its result; None (with the reason in ``infeasible``) where it
        has no plan, except for "hap", whose failure is the user's error (explained)."""
        own = self.candidates(attempt.shares)
        if attempt.pin == self.user_pin and any(not any(c.output == p for c in own[name])
                                                for name, p in self.user_pins.items()):
            self.infeasible[attempt.name] = "these shares leave a pinned placement without a legal candidate"
            return None  # e.g. a pinned weight shard that would be empty on a rank with a zero share
        try:
            result = self.solved(attempt)
        except InfeasiblePlan as e:
            if attempt.name == "hap":
                raise self.explain(attempt) from e
            self.infeasible[attempt.name] = str(e)
            return None
        self.results[attempt.name] = result
        return result

    def solved(self, attempt: Attempt) -> Result:
        """``attempt`` solved under its setup, or where that has no plan, under the fastest memory
        lever that has one (``fit_memory``); the solve's InfeasiblePlan where none has."""
        base, own, restrict = self.setup(attempt.shares), self.candidates(attempt.shares), self.restriction(attempt)
        cm = self.cost_model(base)
        least = memory_report(self.graph, cm, least_memory_choice(self.graph, cm, own, restrict))
        caps = [self.cluster.memory_bytes(r) for r in range(self.cluster.num_ranks)]
        if all(row["total"] <= cap for row, cap in zip(least, caps)):
            try:
                return self.solved_under(attempt, base)
            except InfeasiblePlan:
                pass
        # the least-memory assignment overfills (no solve can fit), or the solve found none; where
        # its parameter state alone overfills a rank, no lever (they divide activations) can help
        state_fits = all(row["total"] - row["activations"] <= cap for row, cap in zip(least, caps))
        fitted = self.fit_memory(attempt) if state_fits else None
        if fitted is None:
            raise InfeasiblePlan(f"{attempt.name}: no assignment fits every rank's memory")
        return fitted

    def solved_under(self, attempt: Attempt, setup: CostSetup) -> Result:
        """The MILP of ``attempt`` under ``setup``; where the temporary buffers of its collectives
        (which the MILP does not count) overfill a rank, solved again with the largest kept free."""
        cm = self.cost_model(setup)
        restrict = self.restriction(attempt)
        res = solve_placements(self.graph, cm, self.candidates(attempt.shares), pin=restrict,
                               time_limit_s=self.time_limit_s)
        ev = evaluate(self.graph, cm, res.choice)
        if not all(m <= self.cluster.memory_bytes(r) for r, m in enumerate(ev.memory_bytes)):
            reserve = collective_temporary(self.graph, cm, res.choice, ev.moves)
            setup = dataclasses.replace(setup, collective_reserve=reserve)
            cm = self.cost_model(setup)
            res = solve_placements(self.graph, cm, self.candidates(attempt.shares), pin=restrict,
                                   time_limit_s=self.time_limit_s)
            ev = evaluate(self.graph, cm, res.choice)
        return Result(attempt, setup, res.choice, ev, res.status)

    def fit_memory(self, attempt: Attempt) -> Result | None:
        """The fastest result of ``attempt`` under its memory levers (``memory_levers``); None
        when none of them has a plan. The levers are sized to fill a fraction of each rank's
        memory (``FILLS``), so that the solve has room to choose faster placements than the
        least-memory ones and for the collectives' buffers; where none of a fill's levers has a
        plan, the next, smaller fill is tried. Of results within ``PREFER_WITHIN`` of the fastest,
        the one that computes least is kept: the share refit moves samples to where compute is
        freed (a rank that no longer recomputes), which the shares of the attempt do not show.
        A lever that lost by ``LEVER_LOSES`` in an earlier hap attempt is tried in the hap
        attempts after it only where the others have no plan."""
        free = attempt.name.startswith("hap")  # the baselines' pins give their levers other odds
        for fill in FILLS:
            results = []
            losing = self.losing_levers if free else set()
            for skip in ((losing, LEVERS - losing) if losing else (set(),)):  # the losers only if no other fits
                for setup in self.memory_levers(attempt, fill, skip):
                    try:
                        results.append(self.solved_under(attempt, setup))
                    except InfeasiblePlan:
                        continue
                if results:
                    break
            if results:
                fastest = min(r.step_s for r in results)
                if free:
                    self.losing_levers |= {lever_kind(r.setup) for r in results if r.step_s > fastest * LEVER_LOSES}
                return min((r for r in results if r.step_s <= fastest * PREFER_WITHIN),
                           key=lambda r: sum(r.evaluation.compute_s))
        return None

    def memory_levers(self, attempt: Attempt, fill: float = 1.0, skip: set[str] | frozenset = frozenset()
                      ) -> list[CostSetup]:
        """Where activations overfill some rank, the setups that let the least-memory assignment
        fit in ``fill`` of every rank's memory: its shares in micro-batches there, the fewest
        blocks recomputed in backward (activation checkpointing, with recompute "auto") on every
        rank or, where some ranks fit with fewer, on each rank the fewest it needs; or every block
        recomputed and the rest in micro-batches. Levers whose ``lever_kind`` is in ``skip`` are
        left out."""
        base, own, restrict = self.setup(attempt.shares), self.candidates(attempt.shares), self.restriction(attempt)
        options = []
        micro = None
        if MICRO not in skip:
            micro = fit_micro_batches(self.graph, self.cluster, self.cost_model(base), own, restrict, fill)
        if micro is not None:
            options.append(dataclasses.replace(base, micro_batches=micro))
        blocks = tuple(self.graph.blocks()) if self.recompute == "auto" else ()
        if blocks:
            fitting: dict[int, tuple[bool, ...]] = {}  # k -> per rank, whether it fits with k blocks recomputed

            def fits_with(k: int, r: int) -> bool:
                if k not in fitting:
                    setup = dataclasses.replace(base, recompute=blocks[:k])
                    fitting[k] = ranks_fitting(self.graph, self.cluster, self.cost_model(setup), own, restrict, fill)
                return fitting[k][r]

            # per rank, the fewest blocks it recomputes to fit (a rank only gains from more)
            counts = [_fewest(lambda k, r=r: fits_with(k, r), len(blocks), least=0)
                      for r in range(self.cluster.num_ranks)]
            if all(k is not None for k in counts):
                k = max(counts)
                every = dataclasses.replace(base, recompute=blocks[:k])
                per_rank = dataclasses.replace(every, recompute_counts=tuple(counts))
                # ranks with room keep the activations of the blocks past their count
                options += [o for o in (every, per_rank) if lever_kind(o) not in skip
                            and (o is every or attempt.per_rank_recompute and min(counts) < k)]
            elif RECOMPUTE_MICRO not in skip:
                every = dataclasses.replace(base, recompute=blocks)
                both = fit_micro_batches(self.graph, self.cluster, self.cost_model(every), own, restrict, fill)
                if both is not None:
                    options.append(dataclasses.replace(every, micro_batches=both))
        return options

    def explain(self, attempt: Attempt) -> InfeasiblePlan:
        """Why ``attempt`` has no plan: the least memory any assignment needs (``explain_memory``)."""
        return explain_memory(self.graph, self.cluster, self.cost_model(self.setup(attempt.shares)),
                              self.candidates(attempt.shares), self.restriction(attempt), self.optimizer,
                              self.recompute)

    def refit(self, result: Result, total: int) -> tuple[int, ...]:
        """Shares re-fitted to the timed work of ``result``, priced under its own setup."""
        return refit_shares(self.graph, self.cost_model(result.setup), result.choice, total)

    def run(self, total: int, say: Callable[[str], None]) -> Result:
        """Solve every attempt (see the module docstring) for a global batch of ``total``; the preferred result."""
        say("solving data-parallel baselines")
        for name, (how, pin) in DATA_PARALLEL.items():
            self.solve(Attempt(name, shares_by(how, self.cluster, total, self.graph.precision), pin,
                               per_rank_recompute=False))
        say("solving placements (MILP)")
        prop = shares_by("speed", self.cluster, total, self.graph.precision)
        even = shares_by("even", self.cluster, total)
        ep = None
        if self.experts == "auto" and self.expert_parallel(prop):  # before "hap", which raises where none fits
            say("solving placements with the experts sharded (expert parallelism)")
            ep = self.solve(Attempt("hap_experts", prop, self.user_pin, experts=True))
        try:
            best = self.solve(self.hap("hap", prop))
        except InfeasiblePlan:
            if ep is None:  # nothing else fits either: the user's error, explained
                raise
            best = ep  # only with the experts sharded does the model fit
            self.infeasible["hap"] = "with every expert on every rank, no assignment fits every rank's memory"
        for it in range(REFIT_ROUNDS):
            new = self.refit(best, total)
            if new == best.attempt.shares:
                break
            say(f"re-fitting shares, round {it + 1}")
            again = self.solve(dataclasses.replace(self.hap(f"hap_refit{it}", new), experts=best.attempt.experts))
            if again is None or again.step_s >= best.step_s * (1 - 1e-6):
                break
            best = again
        if self.cluster.num_ranks > 1 and prop != even and self.could_beat(self.hap("hap_even", even), best):
            flat = self.solve(self.hap("hap_even", even))
            if flat is not None and flat.step_s < best.step_s:
                self.between(flat, best, total, say)
        if "dp_proportional" in self.results and not self.user_pins:  # data parallel, shares fitted to timed work
            dp_shares = self.refit(self.results["dp_proportional"], total)
            if dp_shares != prop:
                self.solve(Attempt("hap_dp_refit", dp_shares, dp_pin))
        return self.best()

    def between(self, better: Result, other: Result, total: int, say: Callable[[str], None]) -> None:
        """Shares halfway between the two results' (bisected ``MID_ROUNDS`` times towards the
        faster side): where even shares beat the speed-fitted ones, the slow ranks' compute hides
        collectives that the fitted shares leave exposed, and the best trade lies between."""
        for it in range(MID_ROUNDS):
            mid = largest_remainder(total, [a + b for a, b in zip(better.attempt.shares, other.attempt.shares)])
            if mid in (better.attempt.shares, other.attempt.shares):
                return
            say(f"solving shares between {better.attempt.name} and {other.attempt.name}")
            got = self.solve(dataclasses.replace(self.hap(f"hap_mid{it}", mid), experts=better.attempt.experts))
            if got is None:
                return
            better, other = (got, better) if got.step_s < better.step_s else (better, got)

    def could_beat(self, attempt: Attempt, best: Result) -> bool:
        """Whether ``attempt`` might predict a faster step than ``best``: its compute alone, each
        node at its cheapest candidate on its slowest rank and without a forward run again in
        backward, is a lower bound of any result of it (the memory levers only add compute, or
        take a chunked loss's second forward away; collectives only add time)."""
        cm, own, restrict = self.cost_model(self.setup(attempt.shares)), self.candidates(attempt.shares), \
            self.restriction(attempt)
        bound = 0.0
        for node in self.graph:
            cands = [c for c in own[node.name] if restrict is None or restrict(node, c)] or own[node.name][:1]
            once = cm.again_factor(node)
            bound += min(max(t / k for t, k in zip(cm.compute_s(node, c), once)) for c in cands)
        if bound < best.step_s:
            return True
        log.info("%s not solved: its compute alone (%.1f ms) is slower than %s's step (%.1f ms)", attempt.name,
                 bound * 1e3, best.attempt.name, best.step_s * 1e3)
        return False

    def expert_parallel(self, shares: tuple[int, ...]) -> bool:
        """Whether some token-wise call can shard its experts under ``shares``."""
        return any(EXPERTS in {c.name for c in cs} for cs in self.candidates(shares).values())

    def best(self) -> Result:
        fastest = min(r.step_s for r in self.results.values())
        if self.user_pins or self.experts == "shard":  # the user asked for this: baselines are for comparison only
            limit = min(r.step_s for k, r in self.results.items() if k.startswith("hap")) * PREFER_WITHIN
        else:
            limit = min([fastest * PREFER_WITHIN] + [self.results[k].step_s for k in DATA_PARALLEL
                                                     if k in self.results])
        for pattern in PREFERENCE:
            for name, r in self.results.items():
                matches = name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern
                if matches and r.step_s <= limit and (not (self.user_pins or self.experts == "shard")
                                                      or name.startswith("hap")):
                    return r
        raise AssertionError("the fastest result is always within the limit")

    def baselines(self) -> dict[str, BaselineResult]:
        out = {}
        for k in DATA_PARALLEL:
            if k in self.results:
                r = self.results[k]
                out[k] = BaselineResult(r.step_s, r.attempt.shares, r.evaluation.comm_s + r.evaluation.grad_sync_s)
            else:  # does not fit the devices' memory: no step time to compare
                out[k] = BaselineResult(None, reason=self.infeasible.get(k, ""))
        return out


def search(graph: Graph, cluster: Cluster, *, optimizer: str = "sgd", strict: bool = False,
           time_limit_s: float = 20.0, spec: str | None = None, pins: dict[str, str] | None = None,
           precision: str = "fp32", grad_reduce: str = "fp32", recompute: str = "auto", experts: str = "auto",
           progress: Callable[[str], None] | None = None, precision_advice: bool = True) -> Plan:
    """Solve every attempt for ``graph`` on ``cluster`` in ``precision`` (``hap.precision.CHOICES``),
    gradients all-reduced in ``grad_reduce``, and return the preferred one as a Plan; ``experts``
    as ``hap.api.plan_graph`` says. ``precision_advice``: note what ``--precision auto`` would
    gain (a pipeline's stage plans leave it out: it would price a stage as if it were the step)."""
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    cluster = resolve(cluster, say)  # device "cpu": this machine's profile
    precision, why = choose_precision(cluster, precision)
    if precision != "fp32":
        say(f"finding each node's dtype under {precision} autocast")
    graph = training_graph(graph, precision, grad_reduce)
    total = global_batch(graph, cluster.num_ranks)
    if total < 1:
        raise InfeasiblePlan("the global batch is empty; give batch() a batch_size of at least 1")
    rows, refused = token_wise_candidates(graph)
    warnings = [f"{x.target} has no sharding rule; it runs replicated ({x.source or x.name})"
                for x in graph.ops() if not has_rule(x.target) and x.name not in rows]
    warnings += [f"{module} is token-wise but runs replicated: {why}" for module, why in refused.items()]
    for w in dict.fromkeys(warnings):
        log.warning(w)
    s = Search(graph, cluster, optimizer=optimizer, strict=strict, time_limit_s=time_limit_s, user_pins={},
               recompute=recompute, experts=experts)
    say(f"enumerating candidates for {len(graph)} nodes")
    s.user_pins = parse_pins(graph, s.candidates(shares_by("speed", cluster, total, graph.precision)), pins or {})
    won = s.run(total, say)
    strategy = "hap" if won.attempt.name.startswith("hap") else won.attempt.name
    expert_notes = experts_notes(graph, s, won)
    notes = [f"precision {precision}: {why}"] + result_notes(graph, cluster, won, recompute, precision_advice) \
        + expert_notes
    return assemble_plan(graph, cluster, won, strategy=strategy, spec=spec, solve_s=time.perf_counter() - t0,
                         baselines=s.baselines(), warnings=list(dict.fromkeys(warnings + result_warnings(graph, won))),
                         notes=notes)


def experts_notes(graph: Graph, s: Search, won: Result) -> list[str]:
    """How the plan runs the experts of token-wise calls: sharded (expert parallelism), with its gain
    over the best plan that keeps them whole, or whole, and why."""
    calls = list(dict.fromkeys(n.token_wise for n in graph.ops() if n.token_wise))
    if not calls:
        return []
    span = _span(tuple(calls))
    whole = [r for k, r in s.results.items() if k.startswith("hap") and not r.attempt.experts]
    if won.attempt.experts:
        experts = next(iter(graph.experts.values()))["experts"]
        lengths = Splitter(won.attempt.shares).lengths(experts)
        mem = max(won.evaluation.memory_bytes)
        text = (f"experts of {len(calls)} calls ({span}) are sharded over the ranks (expert parallelism: "
                f"{experts} experts split {_ranks_list(lengths)}, a faster rank holding more): each token's "
                f"choices go to their experts' ranks and back by all-to-all; predicted {won.step_s * 1e3:.1f} ms")
        if whole:
            best = min(whole, key=lambda r: r.step_s)
            text += (f", {best.step_s / won.step_s:.2f}x the best plan that keeps every expert on every rank "
                     f"({best.step_s * 1e3:.1f} ms)")
        return [text + f"; at most {mem / 2**30:.2f} GiB on a rank" if mem >= 2**30 else
                text + f"; at most {mem / 2**20:.0f} MiB on a rank"]
    if "hap_experts" in s.results:
        ep = s.results["hap_experts"]
        return [f"the experts of {len(calls)} calls ({span}) run on each rank's own tokens, whole on every rank: "
                f"sharding them (expert parallelism) was predicted {ep.step_s * 1e3:.1f} ms against "
                f"{won.step_s * 1e3:.1f} ms"]
    if "hap_experts" in s.infeasible:
        return [f"the experts of {len(calls)} calls ({span}) run on each rank's own tokens, whole on every rank: "
                f"with them sharded, {s.infeasible['hap_experts']}"]
    ctx = RuleContext(graph, Splitter(won.attempt.shares), s.units)
    why = sorted({w for w in expert_parallel_calls(graph, ctx).values() if w})
    return [f"the experts of {len(calls)} calls ({span}) run on each rank's own tokens, whole on every rank"
            + (f": they cannot be sharded, as {'; '.join(why)}" if why else "")]


def _ranks_list(xs: tuple[int, ...]) -> str:
    return ", ".join(map(str, xs)) if len(xs) <= 8 else ", ".join(map(str, xs[:8])) + f", ... ({len(xs)} ranks)"


def result_warnings(graph: Graph, won: Result) -> list[str]:
    """What the user should know of the chosen result: ranks without samples, micro-batches that
    change what a batch-coupled model trains."""
    shares, n = won.attempt.shares, len(won.attempt.shares)
    total, out = sum(shares), []
    idle = [r for r, x in enumerate(shares) if x == 0]
    if idle:
        out.append(f"{len(idle)} of {n} ranks get no samples of the global batch of {total} (ranks "
                   f"{idle[0]}..{idle[-1]}): they only take part in sharded layers; a global batch of at "
                   f"least {n} (--batch-size) gives every rank data")
    coupled = sorted({x.source or x.name for x in graph.ops() if couples_samples(x)})
    if won.setup.micro_batches and coupled:
        out.append("micro-batches change what this model trains: its forward couples the samples of a "
                   "batch (BatchNorm in training mode at " + "; ".join(coupled[:3]) + "), so statistics "
                   "are taken per micro-batch, as under gradient accumulation on one device")
    return out


def result_notes(graph: Graph, cluster: Cluster, won: Result, recompute: str, precision_advice: bool = True) \
        -> list[str]:
    """Why the chosen result trains as it does: the gradient dtype, a faster precision, the
    recomputed blocks, the micro-batches."""
    notes = []
    if graph.grad_reduce != "fp32":
        notes.append(f"gradients are all-reduced in {graph.grad_reduce}: half the bytes of fp32, each rank's "
                     "gradient rounded to 8 mantissa bits before the sum")
    ev = won.evaluation
    notes += grad_sync_notes(graph, cluster, len(won.attempt.shares), ev.grad_buckets, ev.grad_overlap,
                             ev.grad_sync_s, [m.priced.kind for m in ev.moves])
    if graph.precision == "fp32":
        notes += faster_precision(graph, cluster, won) if precision_advice else []
    blocks, counts = won.setup.recompute, won.setup.recompute_counts
    if blocks:
        notes.append(f"activation checkpointing: {len(blocks)} of {len(graph.blocks())} blocks ("
                     f"{_span(blocks)}) run their forward again in backward"
                     + (" on the ranks that need it" if counts else "") + ", keeping only their outputs"
                     + (" (--recompute all)" if recompute == "all" else ", so that activations fit every rank's "
                        "memory"))
    if counts:
        users, all_blocks = graph.users(), graph.blocks()
        kept = {x for b in blocks[min(counts):] for x in all_blocks[b]}
        gathered = any(weight_gather(graph[m.producer], m.src, m.dst) and users[m.producer][0] in kept
                       for m in won.evaluation.moves)
        per = "; ".join(f"ranks {ranks_text([r for r, x in enumerate(counts) if x == k])}: {k}"
                        for k in sorted(set(counts), reverse=True))
        notes.append(f"blocks recomputed per rank, by its free memory ({per}): a rank keeps the activations of "
                     "the blocks past its count" + (" and joins only their weight gathers again in backward"
                                                    if gathered else ""))
    if won.setup.micro_batches:
        notes += micro_batch_notes(cluster, won.setup.shares, won.setup.micro_batches)
    return notes


def assemble_plan(graph: Graph, cluster: Cluster, won: Result, *, strategy: str, spec: str | None = None,
                  solve_s: float = 0.0, baselines: dict[str, BaselineResult] | None = None,
                  warnings: list[str] | None = None, notes: list[str] | None = None) -> Plan:
    """A Plan from a solved result (the search's and every baseline's), with the lower bound
    under the same setup."""
    setup, ev = won.setup, won.evaluation
    nodes = {node.name: NodeChoice(won.choice[node.name], node.target, node.source or "", node.module or "")
             for node in graph}
    moves = tuple(PlannedMove(m.producer, str(m.src), str(m.dst), m.priced.kind, m.priced.form or "",
                              m.priced.seconds) for m in ev.moves)
    predicted = Prediction(ev.step_s, tuple(ev.compute_s), ev.critical_compute_s, ev.comm_s, ev.grad_sync_s,
                           tuple(int(m) for m in ev.memory_bytes), tuple(tuple(b) for b in ev.grad_buckets),
                           bool(ev.grad_overlap), ev.optimizer_s, ev.data_s)
    lb = lower_bound_s(graph, setup.cost_model(graph, cluster))
    return Plan(graph, cluster, setup.shares, nodes, moves, tuple(ev.grad_synced), predicted, baselines or {}, lb,
                solve_s, won.status, setup.optimizer, strategy, spec, tuple(warnings or ()), tuple(notes or ()),
                setup.micro_batches, setup.recompute, setup.recompute_counts)


def _span(labels: tuple[str, ...]) -> str:
    return labels[0] if len(labels) == 1 else f"{labels[0]} .. {labels[-1]}"


def couples_samples(node: Node) -> bool:
    """Whether an op mixes the samples of its batch (so micro-batches compute something else)."""
    return node.target in ("aten.batch_norm.default", "aten._native_batch_norm_legit_functional.default") and \
        bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False))


def grad_sync_notes(graph: Graph, cluster: Cluster, n: int, buckets: Sequence[Sequence[str]], overlap: bool,
                    sync_s: float, move_kinds: Sequence[str], why: str | None = None) -> list[str]:
    """How the replicated parameters' gradients are all-reduced over ``n`` ranks: in
    ``buckets`` overlapped with backward (their sizes and the ``sync_s`` that stays exposed),
    or after backward and why (``why``, else ``overlap_blocker``'s reason)."""
    if n <= 1 or not buckets:
        return []
    if overlap:
        sizes = [sum(graph[p].meta.nbytes for p in b) / 2**20 for b in buckets]
        if len(sizes) == 1:
            return [f"gradients are all-reduced in one bucket ({sizes[0]:.1f} MiB) after backward "
                    f"({sync_s * 1e3:.1f} ms): smaller buckets started during backward would leave no less"]
        return [f"gradients are all-reduced in {len(sizes)} buckets ({', '.join(f'{x:.1f}' for x in sizes)} MiB), "
                f"each but the last while backward runs, launched as its last gradient is ready; "
                f"{sync_s * 1e3:.2f} ms is left after backward"]
    why = why or overlap_blocker(cluster, n, move_kinds)
    return [f"gradients are all-reduced after backward ({sync_s * 1e3:.1f} ms), not while it runs: {why}"]


def micro_batch_notes(cluster: Cluster, shares: tuple[int, ...], micro: tuple[int, ...]) -> list[str]:
    """Say which ranks run micro-batches and why: compute share is not memory share. Ranks of one
    device with the same share and count share one note."""
    gb = 1e9
    alike: dict[tuple[str, int, int], list[int]] = {}
    for r, (share, k) in enumerate(zip(shares, micro)):
        if k > 1:
            alike.setdefault((cluster.ranks[r].device, share, k), []).append(r)
    out = []
    for (device, share, k), ranks in alike.items():
        r = ranks[0]
        who = f"rank {r}" if len(ranks) == 1 else f"ranks {ranks_text(ranks)}"
        out.append(f"{who} ({device}) {'runs its' if len(ranks) == 1 else 'run their'} {share} samples in {k} "
                   f"micro-batches of at most {-(-share // k)} to fit {cluster.memory_bytes(r) / gb:.3g} GB: a "
                   "share follows its rank's speed, its micro-batches its memory")
    return out


def faster_precision(graph: Graph, cluster: Cluster, won: Result) -> list[str]:
    """A note recommending what ``--precision auto`` would pick, with the step time the cost model
    predicts for the same placements under the same setup in that dtype (a re-plan may find a
    faster one)."""
    auto, _ = choose_precision(cluster, "auto")
    if auto == "fp32":
        return []
    low = training_graph(graph, auto, graph.grad_reduce)
    step = evaluate(low, won.setup.cost_model(low, cluster), won.choice).step_s
    if step >= won.step_s:
        return []
    return [f"--precision auto would train in {auto} (autocast, fp32 master weights): the same plan predicts "
            f"{step * 1e3:.2f} ms per step, {won.step_s / step:.2f}x faster than fp32's {won.step_s * 1e3:.2f} ms"]


def least_memory_choice(graph: Graph, cm: CostModel, cands: dict, pin) -> dict[str, Candidate]:
    """Each node's candidate that keeps the least memory on its fullest rank (every tensor
    sharded as far as its rules and pins allow): what any plan needs at least."""
    choice = {}
    for node in graph:
        allowed = [c for c in cands[node.name] if pin is None or pin(node, c)] or cands[node.name]
        choice[node.name] = min(allowed, key=lambda c: max(cm.memory_bytes(node, c)))
    return choice


MICRO, RECOMPUTE, PER_RANK, RECOMPUTE_MICRO = ("micro-batches", "recompute", "recompute per rank",
                                               "recompute and micro-batches")
LEVERS = {MICRO, RECOMPUTE, PER_RANK, RECOMPUTE_MICRO}


def lever_kind(setup: CostSetup) -> str:
    """Which memory lever ``setup`` pulls (``Search.memory_levers``)."""
    if setup.recompute and setup.micro_batches:
        return RECOMPUTE_MICRO
    if setup.recompute:
        return PER_RANK if setup.recompute_counts else RECOMPUTE
    return MICRO


def fits(graph: Graph, cluster: Cluster, cm: CostModel, cands: dict, pin, fill: float = 1.0) -> bool:
    """Whether the least-memory assignment fits ``fill`` of every rank's memory under ``cm``."""
    return all(ranks_fitting(graph, cluster, cm, cands, pin, fill))


def ranks_fitting(graph: Graph, cluster: Cluster, cm: CostModel, cands: dict, pin,
                  fill: float = 1.0) -> tuple[bool, ...]:
    """Per rank, whether the least-memory assignment fits ``fill`` of its memory under ``cm``."""
    report = memory_report(graph, cm, least_memory_choice(graph, cm, cands, pin))
    return tuple(row["total"] <= fill * cluster.memory_bytes(r) for r, row in enumerate(report))


def _fewest(ok: Callable[[int], bool], n: int, least: int = 1) -> int | None:
    """The least k in ``least``..n with ``ok(k)``, for ``ok`` monotone in k (bisection); None if
    ``ok(n)`` fails."""
    if not ok(n):
        return None
    lo, hi = least, n
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def fit_micro_batches(graph: Graph, cluster: Cluster, cm: CostModel, cands: dict, pin,
                      fill: float = 1.0) -> tuple[int, ...] | None:
    """Per rank, the fewest micro-batches that let the least-memory assignment fit ``fill`` of its
    memory: a rank keeps only its largest micro-batch's activations of the tensors that follow
    the batch, and of the peak it reserves (a recomputed block, the largest transient). None
    when no number does (the parameter state alone overfills a rank), the graph's sizes were
    not classified (``hap.capture.classify_batch``) or its loss is not a sum over samples
    (``Graph.batch_products``)."""
    if not graph.batch_size or graph.batch_products():
        return None
    choice = least_memory_choice(graph, cm, cands, pin)
    report = memory_report(graph, cm, choice)
    counts = []
    for r, row in enumerate(report):
        cap, share = fill * cluster.memory_bytes(r), cm.splitter.shares[r]
        if row["total"] <= cap or share <= 1:
            counts.append(cm.micro[r])
            continue
        # the bytes that follow the largest micro-batch, then at the whole share
        piece = sum(cm.batch_activations(node, choice[node.name])[r] for node in graph) + cm.activation_reserve[r]
        divisible = piece / cm.micro_scale[r]
        fixed = row["total"] - piece
        largest = int(share * (cap - fixed) / divisible) if cap > fixed and divisible > 0 else 0
        if largest < 1:
            return None
        counts.append(-(-share // min(largest, share)))
    return tuple(counts) if max(counts) > 1 else None


def explain_memory(graph: Graph, cluster: Cluster, cm: CostModel, cands: dict, pin, optimizer: str,
                   recompute: str = "auto") -> InfeasiblePlan:
    """The least memory any assignment needs (each tensor sharded as far as its rules allow),
    and which rank it still overfills by how much, by part, as an error with the levers that
    would close it (the search has tried micro-batches and, unless ``recompute`` is "none",
    recomputed blocks)."""
    choice = least_memory_choice(graph, cm, cands, pin)
    report = memory_report(graph, cm, choice)
    over = [(row["total"] - cluster.memory_bytes(r), r) for r, row in enumerate(report)]
    excess, r = max(over)
    if excess <= 0:
        return InfeasiblePlan("the solver found no plan that meets every constraint, though the memory would fit; "
                              "check the --pin placements you gave")
    row = report[r]
    gb = 1e9
    micro = f" and its samples in {cm.micro[r]} micro-batches" if cm.micro[r] > 1 else ""
    state = row["total"] - row["activations"]
    fixes = ["a smaller global batch (--batch-size)" if state <= cluster.memory_bytes(r) else
             "more ranks (the parameter state is sharded over all of them)",
             "a cluster with more memory per device"]
    activation_bound = row["activations"] > 0.25 * row["total"]  # activations are a lever worth naming
    if graph.precision == "fp32" and activation_bound:
        fixes.insert(0, "--precision bf16 (activations in half the bytes)")
    if recompute == "none" and graph.blocks():
        fixes.insert(0, "--recompute auto (blocks' activations recomputed in backward)")
    if optimizer != "sgd":
        fixes.insert(0, "--optimizer sgd (no optimizer state)")
    if state > cluster.memory_bytes(r):
        tried = f"; its parameter state alone is {state / gb:.1f} GB, which no micro-batches or recomputation divide"
    else:
        tried = (", with its samples in micro-batches" + (" and blocks recomputed" if recompute != "none" else "")
                 + " too")
    largest = max((n for n in graph if n.name in cm.saved), key=lambda n: max(cm.memory_bytes(n, choice[n.name])),
                  default=None)
    biggest = "" if largest is None or not activation_bound else (f"; the largest activation kept is {largest.name} "
                                          f"({max(cm.memory_bytes(largest, choice[largest.name])) / gb:.1f} GB, "
                                          f"{largest.source or largest.target})")
    return InfeasiblePlan(
        f"no plan fits in memory: rank {r} ({cluster.ranks[r].device}) needs at least {row['total'] / gb:.1f} GB "
        f"(parameters {row['parameters'] / gb:.1f}, gradients {row['gradients'] / gb:.1f}, optimizer "
        f"{row['optimizer'] / gb:.1f}, activations {row['activations'] / gb:.1f}{biggest}) even with every tensor "
        f"sharded as far as the rules allow{micro}, and has {cluster.memory_bytes(r) / gb:.1f} GB{tried}. "
        f"Try: {'; '.join(fixes)}.")


def parse_pins(graph: Graph, cands: dict, pins: dict[str, str]) -> dict[str, Placement]:
    """The user's ``--pin NODE=PLACEMENT`` pins, each checked against what the node's rules offer."""
    from hap.placement import parse

    out = {}
    for name, text in pins.items():
        if name not in graph:
            params = ", ".join(n.name for n in graph.params()[:6])
            raise PinError(f"--pin {name}={text}: no node named {name!r} (parameters are e.g. {params})")
        try:
            p = parse(text)
        except ValueError as e:
            raise PinError(f"--pin {name}={text}: {e}") from None
        offered = sorted({str(c.output) for c in cands[name]})
        if str(p) not in offered:
            raise PinError(f"--pin {name}={text}: {name} can only be placed as {', '.join(offered)}")
        out[name] = p
    return out

"""Baselines are pinned solves on the same cost model, returned as full plans."""
from __future__ import annotations

import pytest

from hap.api import plan_graph
from hap.baselines import BASELINES, baseline, dp_even, dp_proportional, fsdp_even, megatron_tp_even
from hap.cluster import load_cluster
from hap.graph import TensorMeta
from hap.solve import even_shares, speed_shares
from tests.helpers import ROOT, captured, load_example


@pytest.fixture(scope="module")
def mlp():
    return captured(load_example("mlp"))[2]


@pytest.fixture(scope="module")
def cluster():
    return load_cluster("default")


def _batch(graph) -> int:
    return next(n for n in graph if n.kind == "input").meta.shape[0]


def test_data_parallel_baselines_match_the_plans_own(mlp, cluster):
    plan = plan_graph(mlp, cluster, time_limit_s=10)
    de, dprop = dp_even(mlp, cluster), dp_proportional(mlp, cluster)
    assert de.shares == even_shares(2, _batch(mlp)) and dprop.shares == speed_shares(cluster, _batch(mlp))
    for p, key in ((de, "dp_even"), (dprop, "dp_proportional")):
        p.lint()
        assert p.strategy == key
        assert all(p.nodes[x.name].output == "R" for x in mlp.params())
        assert p.predicted_step_s == pytest.approx(plan.baselines[key].predicted_step_s, rel=1e-6)
        assert plan.predicted_step_s <= p.predicted_step_s * (1 + 1e-9)


def test_fsdp_shards_parameters_on_dim0(mlp, cluster):
    p = fsdp_even(mlp, cluster)
    p.lint()
    assert p.shares == even_shares(2, _batch(mlp))
    for x in mlp.params():
        assert p.nodes[x.name].output.startswith("S(0"), (x.name, p.nodes[x.name])
    # every sharded parameter is gathered before use: some all-gather moves exist
    assert any(m.kind == "all_gather" for m in p.moves)
    # parameter state per rank is about half of data parallel's
    de = dp_even(mlp, cluster)
    assert max(p.predicted.memory_bytes) < max(de.predicted.memory_bytes)


def test_megatron_shards_matrices_and_replicates_the_batch(mlp, cluster):
    p = megatron_tp_even(mlp, cluster)
    assert p is not None
    p.lint()
    for x in mlp.params():
        if isinstance(x.meta, TensorMeta) and x.meta.ndim == 2:
            assert p.nodes[x.name].output in ("S(0)", "S(1)"), x.name
    for x in mlp:
        if x.kind == "input":
            assert p.nodes[x.name].output == "R"


def test_a_baseline_whose_activations_overfill_a_rank_gets_the_searchs_memory_levers():
    from tests.test_micro import MIXED, meta_graph

    mixed = load_cluster(MIXED)
    p = dp_proportional(meta_graph(2 ** 22), mixed)
    assert p.strategy == "dp_proportional" and max(p.micro_batches) > 1
    assert all(m <= mixed.memory_bytes(r) for r, m in enumerate(p.predicted.memory_bytes))


def test_baseline_by_name(mlp, cluster):
    for name in BASELINES:
        p = baseline(name, mlp, cluster)
        assert p is None or p.strategy == name
    with pytest.raises(ValueError):
        baseline("zero3", mlp, cluster)
    assert megatron_tp_even(mlp, load_cluster("cpu-homogeneous")) is not None


def test_compare_reports_a_baseline_that_does_not_fit_and_keeps_the_plan(mlp, cluster, monkeypatch):
    import io

    from rich.console import Console

    import hap.baselines as hb
    from hap.errors import InfeasiblePlan
    from hap.report import baselines_table

    plan = plan_graph(mlp, cluster, time_limit_s=10)
    solved = hb.baseline

    def baseline_or_overfill(name, graph, cl, **kw):
        if name == "fsdp_even":
            raise InfeasiblePlan("no plan fits in memory: rank 1 needs at least 9.0 GB")
        return solved(name, graph, cl, **kw)

    monkeypatch.setattr(hb, "baseline", baseline_or_overfill)
    compared = hb.compare(plan, cluster, time_limit_s=10)
    assert not compared.baselines["fsdp_even"].feasible
    assert "rank 1 needs" in compared.baselines["fsdp_even"].reason
    assert compared.baselines["fsdp_cephalo"].feasible and compared.baselines["megatron_tp_even"].feasible
    assert set(compared.nodes) == set(plan.nodes)  # the plan is still there, whatever it became
    assert all(compared.predicted_step_s <= b.predicted_step_s * (1 + 1e-9)
               for b in compared.baselines.values() if b.feasible)
    buf = io.StringIO()
    Console(file=buf, width=200).print(baselines_table(compared))
    assert "fsdp_even" in buf.getvalue() and "does not fit" in buf.getvalue()


def test_cephalo_baseline_shards_state_with_speed_shares():
    from tests.test_micro import MIXED, meta_graph

    mixed = load_cluster(MIXED)
    graph = meta_graph(2 ** 22)
    p = baseline("fsdp_cephalo", graph, mixed)
    assert p.strategy == "fsdp_cephalo" and p.shares == speed_shares(mixed, 2 ** 22)
    assert all(p.nodes[x.name].output.startswith("S(0") for x in graph.params() if x.meta.ndim == 2)
    for r in range(mixed.num_ranks):
        assert p.predicted.memory_bytes[r] <= mixed.memory_bytes(r)


def test_where_even_shares_beat_the_fitted_ones_the_search_bisects_between_them():
    # on 4 slow and 4 fast ranks, a step that is best at 5 samples per fast rank: the fitted
    # shares (6) and even ones (4) both miss it; halfway between them finds it, and the search
    # stops where the next halving rounds to shares it has solved
    from types import SimpleNamespace

    from hap.search import Search

    graph = captured(load_example("mlp"))[2]
    s = Search(graph, load_cluster(ROOT / "profiles/clusters/v100-a100-mem.toml"), optimizer="sgd", strict=False,
               time_limit_s=5, user_pins={})
    solved = []

    def solve(attempt):
        solved.append(attempt.shares)
        return SimpleNamespace(attempt=attempt, step_s=abs(attempt.shares[-1] - 5) + 1.0)

    s.solve = solve
    even = solve(s.hap("hap_even", (4,) * 8))
    fitted = solve(s.hap("hap", (2,) * 4 + (6,) * 4))
    s.between(even, fitted, 32, lambda msg: None)
    assert solved[2:] == [(3,) * 4 + (5,) * 4]


def test_a_memory_lever_that_lost_by_a_quarter_is_not_solved_again_in_later_hap_attempts():
    # micro-batches 2x slower than recomputation in "hap": "hap_refit0" solves recomputation
    # only, and micro-batches again only where nothing else fits; a baseline solves all levers
    import dataclasses
    from types import SimpleNamespace

    from hap.cost import CostSetup
    from hap.errors import InfeasiblePlan
    from hap.search import MICRO, RECOMPUTE, Search, lever_kind

    graph = captured(load_example("mlp"))[2]
    s = Search(graph, load_cluster(ROOT / "profiles/clusters/v100-a100-mem.toml"), optimizer="sgd", strict=False,
               time_limit_s=5, user_pins={})
    base = CostSetup((4,) * 8)
    levers = {MICRO: dataclasses.replace(base, micro_batches=(2,) * 8),
              RECOMPUTE: dataclasses.replace(base, recompute=("blocks.0",))}
    steps = {MICRO: 2.0, RECOMPUTE: 1.0}
    solved = []

    def memory_levers(attempt, fill=1.0, skip=frozenset()):
        return [setup for kind, setup in levers.items() if kind not in skip]

    def solved_under(attempt, setup):
        kind = lever_kind(setup)
        solved.append((attempt.name, kind))
        if kind not in steps:
            raise InfeasiblePlan("no plan")
        return SimpleNamespace(attempt=attempt, setup=setup, step_s=steps[kind],
                               evaluation=SimpleNamespace(compute_s=(steps[kind],) * 8))

    s.memory_levers, s.solved_under = memory_levers, solved_under
    assert lever_kind(s.fit_memory(s.hap("hap", (4,) * 8)).setup) == RECOMPUTE
    assert lever_kind(s.fit_memory(s.hap("hap_refit0", (4,) * 8)).setup) == RECOMPUTE
    del steps[RECOMPUTE]  # where recomputation has no plan, the loser is tried after all
    assert lever_kind(s.fit_memory(s.hap("hap_even", (4,) * 8)).setup) == MICRO
    assert lever_kind(s.fit_memory(s.hap("fsdp_even", (4,) * 8)).setup) == MICRO
    assert solved == [("hap", MICRO), ("hap", RECOMPUTE), ("hap_refit0", RECOMPUTE), ("hap_even", RECOMPUTE),
                      ("hap_even", MICRO), ("fsdp_even", MICRO), ("fsdp_even", RECOMPUTE)]

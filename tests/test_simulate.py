"""The simulator replays plans as per-rank timelines that agree with the solver's objective."""
from __future__ import annotations

import dataclasses
import math

import pytest

from hap.api import plan_graph
from hap.baselines import dp_even
from hap.cluster import load_cluster
from hap.cost import CostSetup
from hap.errors import HapError
from hap.plan import Plan
from hap.simulate import simulate, step_times, timeline_for_baseline
from tests.helpers import ROOT, captured, load_example
from tests.test_micro import MIXED, meta_graph

CLUSTERS = ("default", "cpu-1-2-4", "hap-paper")


@pytest.fixture(scope="module", params=("mlp", "gpt", "cnn"))
def graph(request):
    return captured(load_example(request.param))[2]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_aligned_timeline_reproduces_the_objective(graph, cluster):
    cl = load_cluster(cluster)
    for plan in (plan_graph(graph, cl, time_limit_s=10, stages=1), dp_even(graph, cl, time_limit_s=10)):
        tl = simulate(plan)
        assert tl.mode == "aligned"
        assert _close(tl.step_s, plan.predicted_step_s), (plan.strategy, tl.step_s, plan.predicted_step_s)
        fine = simulate(plan, "segments")
        assert fine.step_s <= tl.step_s * (1 + 1e-9)
        for t in (tl, fine):
            t.lint()
            for d in t.per_rank():  # compute + comm + idle make up the step on every rank
                assert d["compute_s"] + d["comm_s"] + d["idle_s"] == pytest.approx(t.step_s, rel=1e-9)


def test_aligned_timeline_reproduces_micro_batched_and_recomputed_plans():
    # a V100's share runs in micro-batches (its activations overfill 16 GB); every block of the
    # GPT is recomputed: the replay prices both as the search did
    micro = plan_graph(meta_graph(2 ** 22), load_cluster(MIXED))
    assert max(micro.micro_batches) > 1
    gpt = plan_graph(captured(load_example("gpt"))[2], load_cluster("hap-paper"), recompute="all", time_limit_s=10,
                     stages=1)
    assert gpt.recompute
    for plan in (micro, gpt, Plan.from_json(micro.to_json())):
        assert math.isclose(simulate(plan).step_s, plan.predicted_step_s, rel_tol=1e-9), plan.strategy
        assert simulate(plan, "segments").step_s <= plan.predicted_step_s * (1 + 1e-9)


def test_timeline_structure_and_round_trip(graph):
    plan = plan_graph(graph, load_cluster("default"), time_limit_s=10)
    tl = simulate(plan)
    phases = [s.phase for s in tl.segments]
    assert phases.index("backward") > max(i for i, p in enumerate(phases) if p == "forward")
    per = tl.per_rank()
    # what each rank computes is the cost model's per-rank compute (plan.predicted.compute_s)
    for r, d in enumerate(per):
        assert d["compute_s"] == pytest.approx(plan.predicted.compute_s[r], rel=1e-6, abs=1e-12)
    comm = sum(s.comm_s for s in tl.segments)
    assert comm == pytest.approx(plan.predicted.comm_s + plan.predicted.grad_sync_s, rel=1e-9, abs=1e-15)
    again = Plan.from_json(plan.to_json())
    assert _close(simulate(again).step_s, plan.predicted_step_s)
    d = tl.to_json()
    assert d["step_s"] == tl.step_s and len(d["segments"]) == len(tl.segments)
    assert "rank 0" in tl.summary()


def test_timeline_for_baseline_and_step_times(graph):
    plan = plan_graph(graph, load_cluster("default"), time_limit_s=10)
    base = timeline_for_baseline(plan, "dp_even")
    assert _close(base.step_s, plan.baselines["dp_even"].predicted_step_s)
    st = step_times(plan)
    assert _close(st["aligned_s"], st["predicted_s"]) and st["segments_s"] <= st["aligned_s"] * (1 + 1e-9)
    with pytest.raises(ValueError):
        simulate(plan, "nope")
    # the same plan replayed on a cluster given explicitly (same ranks; here the same cluster)
    assert _close(simulate(plan, load_cluster("default")).step_s, plan.predicted_step_s)
    slower = simulate(plan, load_cluster("cpu-slow-net"), mode="segments")
    assert slower.step_s >= simulate(plan, mode="segments").step_s * 0.5
    with pytest.raises(HapError):
        simulate(plan, load_cluster("cpu-1-2-4"))


def test_draw_timelines(tmp_path):
    from hap.timeline import draw

    graph = captured(load_example("mlp"))[2]
    plan = plan_graph(graph, load_cluster("default"), time_limit_s=10)
    out = draw({"hap": simulate(plan), "dp_even": timeline_for_baseline(plan, "dp_even")}, tmp_path / "t.png")
    assert out.exists() and out.stat().st_size > 5000
    big = plan_graph(graph, load_cluster("hap-paper"), time_limit_s=10, stages=1)
    assert draw({"hap": simulate(big, "segments")}, tmp_path / "big.png").exists()


def test_a_block_prefetches_its_weight_gathers_on_devices_that_overlap():
    """Weights gathered before their batch-sharded linears (pinned FSDP-style) on GPUs: inside a
    block each gather after the first runs while the rank computes with the weight before it,
    so only what outlasts that compute is charged (never more than the gather's forward); on
    CPU ranks (no overlap) every gather is charged whole. The aligned replay still equals the
    prediction."""
    from hap.api import plan_spec
    from hap.solve import collective_temporary, evaluate, prefetch_exposure

    pins = {**{f"p_blocks_{b}_{w}_weight": "S(0)" for b in (0, 1) for w in ("qkv", "proj", "fc", "fc_out")},
            "linear": "S(0)", **{f"linear_{i}": "S(0)" for i in range(1, 8)}}
    spec = str(ROOT / "examples/gpt.py")
    for cluster, overlaps in (("a100-l4", True), ("cpu-1-2-4", False)):
        plan = plan_spec(spec, str(ROOT / "profiles/clusters" / f"{cluster}.toml"), pins=pins)
        cm = CostSetup.of_plan(plan).cost_model(plan.graph, plan.cluster)
        choice = plan.choice()
        ev = evaluate(plan.graph, cm, choice)
        whole = [cm.step_move(plan.graph[m.producer], m.src, m.dst) for m in ev.moves]
        gathers = [i for i, m in enumerate(ev.moves) if m.producer in pins and m.dst.kind == "R"]
        assert len(gathers) == 8
        # two of a block's gathers are in flight at once: the reserve holds a pair's buffers
        single = max(cm.move_temporary_bytes(plan.graph[m.producer].meta, m.src, m.dst, m.priced) for m in ev.moves)
        assert collective_temporary(plan.graph, cm, choice, ev.moves) > single
        exposed = prefetch_exposure(plan.graph, cm, choice, [dataclasses.replace(m, priced=w)
                                                              for m, w in zip(ev.moves, whole)])
        assert set(gathers) <= set(exposed)
        for i in gathers:
            assert 0 <= exposed[i] <= whole[i].forward_s * (1 + 1e-12)
        if overlaps:
            assert sum(whole[i].forward_s - exposed[i] for i in gathers) > 0
            assert ev.comm_s < sum(w.seconds for w in whole)
        else:
            assert ev.comm_s == pytest.approx(sum(w.seconds for w in whole), rel=1e-12)
        assert _close(simulate(plan).step_s, plan.predicted_step_s)


def test_a_recomputed_nodes_second_forward_is_replayed_in_backward():
    # recomputing a block adds its forward to backward: the replay's forward of a node in it is
    # the same as without recomputation, and its backward grows by that forward
    from hap.simulate import _split

    graph = captured(load_example("gpt"))[2]
    cluster = load_cluster(ROOT / "profiles/clusters/cpu-1-2-4.toml")
    choice = plan_graph(graph, cluster).choice()
    name = next(x for x in graph.blocks()["blocks.0"] if graph[x].op_class == "matmul")
    parts, totals = [], []
    for recompute in ((), ("blocks.0",)):
        cm = CostSetup((12, 3, 1), recompute=recompute).cost_model(graph, cluster)
        totals.append(cm.compute_s(graph[name], choice[name]))
        parts.append(_split(cm, graph, name, totals[-1]))
    (fwd, back), (fwd_again, back_again) = parts
    assert fwd_again == pytest.approx(fwd)
    assert [b - a for a, b in zip(back, back_again)] == pytest.approx([b - a for a, b in zip(*totals)])
    assert all(b > a for a, b in zip(back, back_again))

"""Planning pipeline stages (hap.pipeline): where to cut, which ranks form a stage, how the
1F1B schedule is priced, and the plan's record of its stages."""
from __future__ import annotations

import dataclasses
import json

import pytest

import hap.pipeline
from hap.api import plan_spec
from hap.cluster import load_cluster
from hap.errors import InfeasiblePlan
from hap.pipeline import balanced_cuts, cut_seconds, groupings, schedule_s, scheduled_memory
from hap.plan import Plan, Schedule
from hap.runtime.pipeline import in_flight, stage_order
from hap.spec import capture_spec, load_spec
from hap.stages import cut_candidates
from hap.timeline import draw_pipeline
from tests.helpers import ROOT

CLUSTERS = ROOT / "profiles" / "clusters"


def test_one_micro_batch_runs_the_stages_one_after_another():
    # stage 0 runs F (1), hands on (0.5), the last stage runs F+B (3), hands back (0.5), stage 0 runs B (2)
    ends = schedule_s([1.0, 0.0], [2.0, 3.0], [0.5], 1)
    assert ends == pytest.approx([1.0 + 0.5 + 3.0 + 0.5 + 2.0, 1.0 + 0.5 + 3.0])


def test_micro_batches_overlap_the_stages_in_1f1b_order():
    # stage 0: F0 0-1, F1 1-2, B0 4-7 (after the last stage's B0 1-4), F2 7-8, B1 8-11, F3 11-12,
    # B2 12-15, B3 15-18; the last stage: B1 4-7, B2 8-11 (after F2), B3 12-15 (after F3)
    events = []
    ends = schedule_s([1.0, 0.0], [3.0, 3.0], [0.0], 4, events)
    assert ends == pytest.approx([18.0, 15.0])
    assert max(ends) < 4 * (1.0 + 3.0 + 3.0)  # less than running the stages one after another
    first = [(kind, j) for s, kind, j, _, _ in sorted(events, key=lambda e: e[3]) if s == 0]
    assert first == stage_order("1f1b", 0, 2, 4)


def test_gpipe_does_not_wait_on_round_trips_a_slow_cut_makes():
    # a cut of 5 each way: 1F1B's stage 0 sends F1, then waits for B0's gradient before F2 (a
    # round trip of 5 + 3 + 5); GPipe's sends every F first. The cut carries one micro-batch at
    # a time, so F0..F3's activations arrive at 6, 11, 16, 21; the last stage's B3 ends at 24,
    # its gradient arrives at 29, and stage 0's last B ends at 31
    one = schedule_s([1.0, 0.0], [2.0, 3.0], [5.0], 4, schedule="1f1b")
    sends = []
    gpipe = schedule_s([1.0, 0.0], [2.0, 3.0], [5.0], 4, schedule="gpipe", transfers=sends)
    assert max(gpipe) < max(one)
    assert max(gpipe) == pytest.approx(1.0 + 4 * 5.0 + 3.0 + 5.0 + 2.0)
    assert sorted((s, kind, j) for s, kind, j, _, _ in sends) == sorted(
        [(0, "F", j) for j in range(4)] + [(1, "B", j) for j in range(4)])
    for s in range(2):  # a stage's links carry one send at a time, each for the cut's time
        mine = sorted((t0, t1) for st, _, _, t0, t1 in sends if st == s)
        assert all(t1 - t0 == pytest.approx(5.0) for t0, t1 in mine)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(mine, mine[1:]))


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_a_middle_stage_receives_one_transfer_at_a_time_from_both_sides(schedule):
    # three stages, cuts as long as a step: stage 1 receives activations from stage 0 and
    # gradients from stage 2 through the same links, so those never overlap, nor do its sends;
    # every step starts after its input has arrived
    events, sends = [], []
    schedule_s([1.0, 1.0, 0.0], [2.0, 2.0, 3.0], [2.5, 2.5], 6, events, schedule, sends)
    to = {(s, kind, j): (s + 1 if kind == "F" else s - 1, t0, t1) for s, kind, j, t0, t1 in sends}
    for stage in range(3):
        for side in ([(t0, t1) for (s, _, _), (_, t0, t1) in to.items() if s == stage],
                     [(t0, t1) for _, (b, t0, t1) in to.items() if b == stage]):
            side.sort()
            assert all(a[1] <= b[0] + 1e-12 for a, b in zip(side, side[1:]))
    got = {(b, kind, j): t1 for (_, kind, j), (b, _, t1) in to.items()}
    for s, kind, j, t0, _ in events:
        need = "F" if kind == "F" or s == 2 else "B"
        if (s, need) != (0, "F"):
            assert t0 >= got[(s, need, j)] - 1e-12
    assert len(sends) == 2 * 2 * 6


def test_a_cut_between_stages_of_several_nodes_spreads_over_their_node_links():
    # hap-paper: nodes of 8 ranks; every sender sends each receiver the rows they share, and
    # each node's rows leave through its own link, so two nodes to two nodes take half as long
    paper = load_cluster(CLUSTERS / "hap-paper.toml")
    nodes = paper.nodes()
    link = paper.group_link([*nodes[2], *nodes[3], *nodes[4], *nodes[5]])
    one = cut_seconds(paper, nodes[2], nodes[3], [4] * 8, [4] * 8, 64e6)
    two = cut_seconds(paper, nodes[2] + nodes[3], nodes[4] + nodes[5], [2] * 16, [2] * 16, 64e6)
    assert one - link.alpha_s == pytest.approx(64e6 / link.bytes_per_s)
    assert two - link.alpha_s == pytest.approx(32e6 / link.bytes_per_s)
    # uneven shares: the node holding more of the rows sets the time
    skew = cut_seconds(paper, nodes[2] + nodes[3], nodes[4] + nodes[5], [3] * 8 + [1] * 8, [2] * 16, 64e6)
    assert skew - link.alpha_s == pytest.approx(48e6 / link.bytes_per_s)


def test_1f1b_keeps_at_most_as_many_micro_batches_as_stages_follow_plus_one_and_gpipe_all():
    one = stage_order("1f1b", 0, 3, 4)
    assert one == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("B", 2), ("B", 3)]
    one = stage_order("1f1b", 1, 3, 4)
    assert one == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)]
    assert stage_order("1f1b", 2, 3, 4) == stage_order("gpipe", 2, 3, 4) == [("B", j) for j in range(4)]
    assert stage_order("gpipe", 0, 3, 4) == [*[("F", j) for j in range(4)], *[("B", j) for j in range(4)]]
    for stages, m in ((2, 1), (3, 2), (4, 8), (4, 32)):
        for s in range(stages):
            order, live, most = stage_order("1f1b", s, stages, m), 0, 0
            for kind, _ in order:
                live += 1 if kind == "F" else (-1 if s < stages - 1 else 0)
                most = max(most, live)
            assert most <= min(stages - s, m)
            assert in_flight("1f1b", s, stages, m) == (most if s < stages - 1 else 1)
            assert in_flight("gpipe", s, stages, m) == (m if s < stages - 1 else 1)
            assert sorted(j for kind, j in order if kind == "B") == list(range(m))
            for warmup in (1, 3):  # a longer warm-up keeps that many more, up to the whole batch
                assert in_flight("1f1b", s, stages, m, warmup) == (min(stages - s + warmup, m)
                                                                   if s < stages - 1 else 1)
        for warmup in (0, 1, 3):  # every stage runs every step: no receive waits forever
            events = []
            schedule_s([1.0] * (stages - 1) + [0.0], [2.0] * stages, [0.5] * (stages - 1), m, events,
                       warmup=warmup)
            assert len(events) == (2 * stages - 1) * m


def test_a_schedule_is_priced_only_where_every_rank_holds_the_activations_it_keeps_in_flight(tmp_path, monkeypatch):
    # devices of 2.5 MiB: the small GPT's first stage keeps its whole batch's activations under
    # GPipe (3.2 MB), more than it has; 1F1B keeps two micro-batches' at a time, and more with
    # a longer warm-up
    cpu = json.loads((ROOT / "profiles/devices/cpu.json").read_text())
    (tmp_path / "small.json").write_text(json.dumps({**cpu, "name": "small", "memory_bytes": 5 * 2**19}))
    (tmp_path / "small.toml").write_text(f'[network]\ninter_node_gbps = 0.1\n[[nodes]]\ndevice = '
                                         f'"{tmp_path / "small.json"}"\ncount = 1\nrepeat = 2\n')
    plan = plan_spec(str(ROOT / "examples/gpt.py"), str(tmp_path / "small.toml"), stages=2)
    sch, k, memo = plan.schedule, len(plan.stages), {}
    m, first = sch.micro_batches, plan.stages[0].plan
    assert sch.name == "1f1b" and m > 1
    assert max(scheduled_memory(first, m, in_flight("gpipe", 0, k, m), memo)) > 5 * 2**19
    for s, st in enumerate(plan.stages):
        kept = scheduled_memory(st.plan, m, in_flight(sch.name, s, k, m, sch.warmup), memo)
        assert st.plan.predicted.memory_bytes == tuple(int(b) for b in kept)  # what its schedule keeps
        assert all(b <= 5 * 2**19 for b in kept)
        assert st.plan.micro_batches == (m,) * len(st.ranks)  # the pipeline's, not its own search's
        assert [plan.predicted.memory_bytes[r] for r in st.ranks] == list(st.plan.predicted.memory_bytes)
    assert any(n.startswith(f"stage 0: {sch.shown} keeps at most {2 + sch.warmup} of the") for n in plan.notes)
    # one micro-batch is the whole batch on every schedule: forced, a clear error; "auto", one stage
    monkeypatch.setattr(hap.pipeline, "MICRO_BATCHES", (1,))
    with pytest.raises(InfeasiblePlan, match="activations its stage keeps in flight"):
        plan_spec(str(ROOT / "examples/gpt.py"), str(tmp_path / "small.toml"), stages=2)
    assert not plan_spec(str(ROOT / "examples/gpt.py"), str(tmp_path / "small.toml")).pipelined


def test_cuts_balance_work_against_each_stage_speed(monkeypatch):
    monkeypatch.setenv("HAP_GPT_LAYERS", "4")
    graph = capture_spec(load_spec(str(ROOT / "examples/gpt.py")))
    cands = cut_candidates(graph)
    assert len(cands) == 3
    assert balanced_cuts(graph, [1.0, 1.0]) == [cands[1]]  # two blocks each
    assert balanced_cuts(graph, [1.0, 3.0]) == [cands[0]]  # the slow stage takes one block
    assert balanced_cuts(graph, [3.0, 1.0]) == [cands[2]]


def test_stages_take_whole_nodes_or_contiguous_ranks():
    one_node = load_cluster(CLUSTERS / "cpu-1-2-4.toml")
    assert set(groupings(one_node, 2)) == {((0,), (1, 2)), ((0, 1), (2,))}
    assert groupings(one_node, 4) == []
    paper = load_cluster(CLUSTERS / "hap-paper.toml")
    for groups in groupings(paper, 2):
        nodes = [{paper.ranks[r].node for r in g} for g in groups]
        assert not nodes[0] & nodes[1]  # no node is split between stages
        assert sorted(r for g in groups for r in g) == list(range(paper.num_ranks))
    # 64 nodes into 6 stages are 7 million splits: only those near an even split are scored
    big = load_cluster(CLUSTERS / "a100-v100-32x32.toml")
    found = groupings(big, 6)
    assert len(found) == 4
    for groups in found:
        assert [r for g in groups for r in g] == list(range(big.num_ranks))
        assert all(len(g) % 8 == 0 for g in groups)  # whole nodes of 8
    sums = [[sum(big.speed(r) for r in g) for g in groups] for groups in found]
    assert max(sums[0]) / min(sums[0]) <= 1.25
    assert [max(s) / min(s) for s in sums] == sorted(max(s) / min(s) for s in sums)


def test_a_pipelined_plan_records_its_stages_and_round_trips():
    plan = plan_spec(str(ROOT / "examples/gpt.py"), str(CLUSTERS / "cpu-1-2-4.toml"), stages=2)
    assert plan.pipelined and plan.strategy == "hap_pipeline"
    d = plan.to_json()
    assert [sorted(st) for st in [s["ranks"] for s in d["stages"]]] in ([[0], [1, 2]], [[0, 1], [2]])
    for st in d["stages"]:
        assert sum(d["ranks"][r]["batch_share"] for r in st["ranks"]) == d["global_batch"]
        assert st["micro_batches"] >= 1 and st["blocks"]
    assert "hap_1_stage" in d["baselines"]
    again = Plan.from_json(json.loads(json.dumps(d)))
    assert again.digest() == plan.digest() and len(again.stages) == 2
    assert again.stages[0].sends == again.stages[1].receives
    assert again.schedule == plan.schedule and 0 <= plan.schedule.bubble < 1
    # each cut says what it moves and whether its node links keep up with the stages' compute
    cuts = [n for n in plan.notes if n.startswith("the cut between stages")]
    assert len(cuts) == len(plan.stages) - 1 and "ms a step each way" in cuts[0]


def test_the_timeline_draws_the_schedule_the_step_was_priced_by(tmp_path):
    plan = plan_spec(str(ROOT / "examples/gpt.py"), str(CLUSTERS / "cpu-slow-net.toml"), stages=2)
    sch, k = plan.schedule, len(plan.stages)
    events = []
    ends = schedule_s(sch.forward_s, sch.backward_s, sch.cut_s, sch.micro_batches, events, sch.name,
                      warmup=sch.warmup)
    assert sch.step_s(ends) == pytest.approx(plan.predicted_step_s)
    # gpt's tied embedding and head: stages 0 and 1 hold it, and sum it after their own syncs
    assert sch.tied_stages == (0, k - 1) and sch.tied_s > 0
    assert sch.step_s(ends) == pytest.approx(max(e + a for e, a in zip(ends, sch.after_s)) + sch.tied_s)
    m = sch.micro_batches
    assert sorted((s, kind, j) for s, kind, j, _, _ in events) == sorted(
        [(s, "F", j) for s in range(k - 1) for j in range(m)] + [(s, "B", j) for s in range(k) for j in range(m)])
    for s in range(k):  # a stage runs one thing at a time
        mine = sorted((t0, t1) for st, _, _, t0, t1 in events if st == s)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(mine, mine[1:]))
    png = draw_pipeline(plan, tmp_path / "schedule.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_tied_weight_is_summed_across_its_stages_once():
    # examples/gpt.py's tok.weight is also head.weight: two keys, one tensor, one all-reduce
    from hap.pipeline import tied_seconds
    from hap.stages import shared_params, split

    graph = capture_spec(load_spec(str(ROOT / "examples/gpt.py")))
    parts = split(graph, cut_candidates(graph))
    assert set(shared_params(parts)) == {"tok.weight", "head.weight"}
    cluster = load_cluster(CLUSTERS / "cpu-slow-net.toml")
    link = cluster.group_link([0, 1])
    nbytes = graph["p_tok_weight"].out.nbytes
    assert tied_seconds(cluster, parts, [(0,), (1,)]) == pytest.approx(2 * link.alpha_s + 2 * nbytes / link.bytes_per_s)


def test_only_the_stages_that_share_a_weight_wait_for_its_all_reduce():
    # stages 0 and 2 hold the tied weight; stage 1 ends last, after both have summed it
    sch = Schedule(1, (0.1, 0.1, 0.0), (0.2, 0.2, 0.3), (0.0, 0.0), (0.1, 0.5, 0.1), 0.2, 0.0, "1f1b", (0, 2))
    ends = [1.0, 1.1, 1.2]
    assert sch.tied_start_s(ends) == pytest.approx(1.3)
    assert sch.step_s(ends) == pytest.approx(1.6)  # stage 1's own sync, not 1.3 + 0.2
    longer = dataclasses.replace(sch, tied_s=0.4)
    assert longer.step_s(ends) == pytest.approx(1.7)
    # a plan written without the field: the tied all-reduce follows every stage's own
    d = sch.to_json()
    del d["tied_stages"]
    assert Schedule.from_json(d).step_s(ends) == pytest.approx(1.8)
    assert Schedule.from_json(sch.to_json()) == sch

"""Relations of the cost model (not magic numbers)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hap.cluster import Link, load_cluster
from hap.cost import CostModel, CostSetup, collective_s
from hap.graph import TensorMeta
from hap.placement import P, R, S, Splitter
from tests.helpers import ROOT, captured, load_example

LINK = Link(alpha_s=20e-6, bytes_per_s=10e9)


def test_all_reduce_is_no_dearer_than_reduce_scatter_plus_all_gather():
    for n in (2, 3, 8, 64):
        even = (1 / n,) * n
        for nbytes in (1e3, 1e6, 1e9):
            ar = collective_s("all_reduce", nbytes, even, LINK, "")
            rs = collective_s("reduce_scatter", nbytes, even, LINK, "padded")
            ag = collective_s("all_gather", nbytes, even, LINK, "padded")
            assert ar <= rs + ag + 1e-15


def test_padded_and_grouped_cross_over():
    """The grouped all-gather is an all-to-all in which the largest owner sends its shard N-1
    times: as many bytes as padding every shard to it, so it never beats padded. A grouped
    all-to-all moves only what changes owner: it wins once bandwidth-bound and uneven."""
    fr = (0.55, 0.25, 0.1, 0.1)
    for nbytes in (1e3, 1e9):
        assert collective_s("all_gather", nbytes, fr, LINK, "padded") <= \
            collective_s("all_gather", nbytes, fr, LINK, "grouped")
    to = (0.1, 0.1, 0.25, 0.55)
    small = [collective_s("all_to_all", 1e3, fr, LINK, form, to) for form in ("padded", "grouped")]
    big = [collective_s("all_to_all", 1e9, fr, LINK, form, to) for form in ("padded", "grouped")]
    assert small[0] < small[1], "latency-bound: one padded collective wins"
    assert big[1] < big[0], "bandwidth-bound and uneven: grouped wins"


def test_collectives_grow_with_bytes_and_ranks():
    a = collective_s("all_reduce", 1e6, (0.5, 0.5), LINK, "")
    b = collective_s("all_reduce", 1e7, (0.5, 0.5), LINK, "")
    c = collective_s("all_reduce", 1e6, (0.25,) * 4, LINK, "")
    assert a < b and a < c
    assert collective_s("all_reduce", 1e6, (1.0,), LINK, "") == 0


def test_a_cost_setup_is_one_frozen_value_and_builds_its_model():
    graph = captured(load_example("gpt"))[2]
    setup = CostSetup([12, 4], "adam", (1, 1))
    assert setup.shares == (12, 4) and setup.micro_batches == () and setup == CostSetup((12, 4), "adam")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setup.collective_reserve = 1.0
    tight = dataclasses.replace(setup, micro_batches=(2, 1), recompute=("blocks.0",), collective_reserve=5e6)
    cm = tight.cost_model(graph, load_cluster(None))
    assert cm.splitter.shares == (12, 4) and cm.micro == (2, 1) and cm.recompute == ("blocks.0",)
    assert cm.collective_reserve == 5e6 and cm.opt_states == 2 and max(cm.recompute_peak) > 0


def test_conversions_and_their_duals():
    graph = captured(load_example("mlp"))[2]
    cm = CostModel(graph, load_cluster(None), Splitter((48, 16)))
    meta = TensorMeta((64, 256), "float32")
    assert cm.price_move(meta, R, S(0)).seconds == 0
    assert cm.price_move(meta, R, P).seconds == 0
    assert cm.price_move(meta, S(0), R).kind == "all_gather"
    assert cm.price_move(meta, P, R).kind == "all_reduce"
    assert cm.price_move(meta, P, S(1)).kind == "reduce_scatter"
    assert cm.price_move(meta, S(0), S(1)).kind == "all_to_all"
    fwd_only = cm.price_move(meta, P, R, grad=False).seconds
    assert cm.price_move(meta, P, R, grad=True).seconds == 2 * fwd_only  # backward is an all-reduce too


def test_slower_rank_computes_slower_and_replication_costs_the_slowest():
    graph = captured(load_example("mlp"))[2]
    cluster = load_cluster(ROOT / "profiles" / "clusters" / "default.toml")  # slowdowns 1 and 3
    cm = CostModel(graph, cluster, Splitter((32, 32)))
    from hap.rules import RuleContext, candidates, view_units
    node = next(n for n in graph.ops() if n.target == "aten.linear.default")
    ctx = RuleContext(graph, Splitter((32, 32)), view_units(graph))
    cands = {c.name: c for c in candidates(node, ctx)}
    rep = cm.compute_s(node, cands["R"])
    assert rep[1] > 2.5 * rep[0]
    shard = next(c for c in cands.values() if c.output == S(0))
    assert max(cm.compute_s(node, shard)) < max(rep)


def test_gradient_buckets_overlap_backward_only_where_the_devices_can(monkeypatch):
    from hap.api import plan_graph
    from hap.solve import grad_sync_schedule

    monkeypatch.setenv("HAP_MLP_WIDTH", "2048")  # 34 MB of gradients
    graph = captured(load_example("mlp"), batch_size=8192)[2]  # a backward long enough to hide buckets behind
    pins = {p.name: "R" for p in graph.params()}  # data parallel: every gradient is all-reduced
    for name, can in (("v100x8", True), ("default", False)):  # GPUs overlap; CPU ranks share the cores
        cluster = load_cluster(ROOT / "profiles" / "clusters" / f"{name}.toml")
        plan = plan_graph(graph, cluster, pins=pins)
        cm = CostModel(graph, cluster, Splitter(plan.shares))
        choice = plan.choice()
        synced = [p.name for p in graph.params()]
        buckets, exposed = grad_sync_schedule(graph, cm, choice, synced, overlap=can)
        assert plan.predicted.grad_overlap is can and plan.predicted.grad_buckets == tuple(map(tuple, buckets))
        assert sorted(p for b in buckets for p in b) == sorted(synced)
        serial = sum(cm.all_reduce_s(sum(graph[p].meta.nbytes for p in b)) for b in buckets)
        assert plan.predicted.grad_sync_s == exposed
        if can:  # the plan's bucket size: all but the last bucket hide behind backward
            assert len(buckets) > 1 and exposed < serial
            assert exposed < grad_sync_schedule(graph, cm, choice, synced, overlap=False)[1]
        else:
            assert exposed == pytest.approx(serial)


def test_a_gpu_rank_reads_its_batch_over_the_host_link():
    """The batch is host work plus a copy over PCIe, not a read at the GPU's memory bandwidth."""
    from hap.rules import Candidate

    graph = captured(load_example("mlp"))[2]
    x = next(n for n in graph if n.kind == "input")
    cluster = load_cluster(ROOT / "profiles" / "clusters" / "v100x8.toml")
    cm = CostModel(graph, cluster, Splitter((8,) * 8))
    shard = Candidate("S", (), S(0), split=(x.meta.shape[0], 1))
    v100 = cluster.profile(0)
    assert v100.host_bytes_per_s and v100.host_bytes_per_s < v100.memory_bytes_per_s / 10
    assert cm.compute_s(x, shard)[0] == pytest.approx(x.meta.nbytes / 8 / v100.host_bytes_per_s)
    cpus = load_cluster(None)
    cpu = CostModel(graph, cpus, Splitter((48, 16)))
    assert cpu.compute_s(x, shard)[0] == pytest.approx(x.meta.nbytes * 48 / 64 / cpus.profile(0).memory_bytes_per_s)


def test_a_replicated_gradient_is_counted_twice_its_bucket_beside_the_fresh_one():
    graph = captured(load_example("mlp"))[2]
    cm = CostModel(graph, load_cluster(None), Splitter((48, 16)))
    w = graph["p_hidden_1_weight"]
    from hap.rules import Candidate

    replicated = cm.memory_parts(w, Candidate("R", (), R))
    sharded = cm.memory_parts(w, Candidate("S(0)", (), S(0), split=(256, 1)))
    assert replicated["gradients"] == tuple(2 * x for x in replicated["parameters"])
    assert sharded["gradients"] == sharded["parameters"]  # a shard's gradient is not all-reduced from a bucket


def test_a_padded_collective_holds_n_shards_of_the_largest_length_while_it_runs():
    from hap.cost import PricedMove

    graph = captured(load_example("mlp"))[2]
    cm = CostModel(graph, load_cluster(None), Splitter((48, 16)))
    meta = TensorMeta((64, 256), "float32")  # split 192:64 on dim 1 (shares 3:1)
    padded = cm.move_temporary_bytes(meta, S(1), R, PricedMove("all_gather", "padded", 0.0))
    assert padded == 2 * 0.75 * meta.nbytes
    assert cm.move_temporary_bytes(meta, S(1), R, PricedMove("all_gather", "grouped", 0.0)) == meta.nbytes
    assert cm.move_temporary_bytes(meta, R, S(1), PricedMove("slice", "", 0.0)) == 0.0
    # an all-to-all moves a rank's own pieces: the grouped form packs its 3/4 shard of dim 1 and
    # receives (and assembles) its 3/4 shard of dim 0, never the whole tensor of every rank
    grouped = cm.move_temporary_bytes(meta, S(1), S(0), PricedMove("all_to_all", "grouped", 0.0))
    assert grouped == pytest.approx((0.75 + 2 * 0.75) * meta.nbytes)
    wide = CostModel(graph, load_cluster(ROOT / "profiles/clusters/hap-paper.toml"), Splitter((1,) * 64))
    many = TensorMeta((64, 64 * 16), "float32")
    assert wide.move_temporary_bytes(many, S(1), S(0), PricedMove("all_to_all", "grouped", 0.0)) < many.nbytes / 10


class _Head(torch.nn.Module):
    """x -> linear -> relu -> linear (+ x) -> float() -> cross-entropy: HF's head in small."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x, y):
        h = self.b(torch.relu(self.a(x))) + x
        return torch.nn.functional.cross_entropy(h.float(), y)


def test_activations_are_what_autograd_keeps_and_an_output_lives_beside_its_gradient():
    from hap.capture import capture
    from hap.cost import saved_for_backward

    g = capture(_Head(), (torch.randn(8, 16), torch.randint(0, 16, (8,))))
    kept = {g[x].target for x in saved_for_backward(g, g.requires_grad())}
    # relu keeps its output (b's input too); the linear a's output is read only by relu; the
    # sum and the cast keep nothing, cross-entropy keeps the logits it reads (its log-softmax)
    assert "aten.relu.default" in kept and "aten.linear.default" not in kept and "aten.add.Tensor" not in kept
    names = {g[x].target: x for x in saved_for_backward(g, g.requires_grad())}
    ce = next(n for n in g.ops() if "cross_entropy" in n.target)
    assert len(names) == 2 and ce.inputs()[0] in {x for x in saved_for_backward(g, g.requires_grad())} | {
        g[ce.inputs()[0]].inputs()[0]}
    cm = CostSetup((4, 4)).cost_model(g, load_cluster("default"))
    largest = max(n.meta.nbytes for n in g.ops() if n.name in cm.requires_grad and n.op_class != "view"
                  and isinstance(n.meta, TensorMeta))
    # at each rank's half of the batch (the loss's logits are less than a chunk: torch's own loss)
    assert cm.chunked and not any(on for ranks in cm.chunked_on.values() for on in ranks)
    assert cm.transient_peak == (2 * largest / 2, 2 * largest / 2)


def test_an_export_metadata_assert_reads_its_tensor_where_it_lies():
    from hap.capture import capture
    from hap.rules import RuleContext, candidates, view_units

    class Cast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x).to(torch.float32).pow(2).mean()

    g = capture(Cast(), (torch.randn(6, 8),))
    asserts = [n for n in g.ops() if n.target == "aten._assert_tensor_metadata.default"]
    if not asserts:
        pytest.skip("this torch version's export writes no metadata assert for .to()")
    ctx = RuleContext(g, Splitter((4, 2)), view_units(g))
    offered = {str(c.inputs[0]) for c in candidates(asserts[0], ctx)}
    assert {"R", "P", "S(0)"} <= offered  # never forces its input to be gathered
    assert asserts[0].bytes == 0 and asserts[0].flops == 0


def test_a_collective_is_priced_as_often_as_the_step_runs_it():
    """In lockstep every rank runs the largest number of micro-batches: a weight's all-gather
    (it does not follow the batch) runs whole in each, an activation's moves a micro-batch's
    rows each time (the same bytes in all); a move read first inside a recomputed block runs
    its forward collective again in backward."""
    graph = captured(load_example("gpt"))[2]
    cluster = load_cluster(None)
    one = CostSetup((12, 4)).cost_model(graph, cluster)
    micro = CostSetup((12, 4), micro_batches=(3, 1)).cost_model(graph, cluster)
    again = CostSetup((12, 4), recompute=("blocks.0",)).cost_model(graph, cluster)
    weight, act = graph["p_blocks_0_qkv_weight"], graph["layer_norm"]
    assert not weight.follows_batch and act.follows_batch
    single = one.price_move(weight.meta, S(0), R, True)
    assert one.step_move(weight, S(0), R) == single and 0 < single.forward_s < single.seconds
    stepped = micro.step_move(weight, S(0), R)
    assert stepped.seconds == pytest.approx(3 * single.seconds) and stepped.forward_s == pytest.approx(
        3 * single.forward_s)
    assert micro.step_move(act, S(0), R).seconds == pytest.approx(one.step_move(act, S(0), R).seconds)
    rerun = again.step_move(weight, S(0), R)  # its reader, linear, is in blocks.0
    assert rerun.seconds == pytest.approx(single.seconds + single.forward_s)
    assert rerun.forward_s == pytest.approx(single.forward_s)
    outside = graph["p_tok_weight"]  # read by the embedding, before any block
    assert again.step_move(outside, S(0), R) == one.step_move(outside, S(0), R)


def test_a_weight_read_only_by_autocast_matmuls_is_gathered_in_their_dtype():
    """Under bf16 autocast a weight whose readers are all matmuls is all-gathered as the bf16
    copy autocast makes (half the bytes forward), its gradient reduce-scattered in fp32; a
    weight read elsewhere too (the tied embedding) is gathered whole in fp32."""
    from hap.cost import low_precision_gathers
    from hap.precision import training_graph

    graph = captured(load_example("gpt"))[2]
    low = training_graph(graph, "bf16", "fp32")
    assert low_precision_gathers(graph) == {}
    gathers = low_precision_gathers(low)
    assert gathers.get("p_blocks_0_qkv_weight") == "bfloat16" and "p_tok_weight" not in gathers
    cluster = load_cluster(None)
    fp32, bf16 = (CostSetup((12, 4)).cost_model(g, cluster) for g in (graph, low))
    w = low["p_blocks_0_qkv_weight"]
    whole, half = fp32.step_move(graph[w.name], S(0), R), bf16.step_move(w, S(0), R)
    assert half.forward_s < whole.forward_s
    assert half.seconds - half.forward_s == pytest.approx(whole.seconds - whole.forward_s)  # fp32 backward
    assert bf16.step_move(low["p_tok_weight"], S(0), R) == bf16.price_move(low["p_tok_weight"].meta, S(0), R)


def test_a_weight_gathered_whole_and_saved_for_backward_counts_in_memory():
    """A linear keeps its weight for backward: gathered whole, that is the whole weight on every
    rank (its bf16 copy where it is gathered as one); where the linear's block is recomputed the
    gather is made again in backward and nothing is kept from forward, on the ranks that
    recompute it. A replicated-to-shard slice keeps nothing new."""
    from hap.precision import training_graph

    graph = captured(load_example("gpt"))[2]
    low = training_graph(graph, "bf16", "fp32")
    cluster = load_cluster(None)
    plain, half = (CostSetup((12, 4)).cost_model(g, cluster) for g in (graph, low))
    again = CostSetup((12, 4), recompute=("blocks.0",)).cost_model(graph, cluster)
    mixed = CostSetup((12, 4), recompute=("blocks.0",), recompute_counts=(1, 0)).cost_model(graph, cluster)
    w = graph["p_blocks_0_qkv_weight"]
    b = float(w.meta.nbytes)
    assert plain.kept_move_bytes(w, S(0), R) == (b, b)
    assert half.kept_move_bytes(low[w.name], S(0), R) == (b / 2, b / 2)
    assert again.kept_move_bytes(w, S(0), R) == (0, 0)
    assert mixed.kept_move_bytes(w, S(0), R) == (0, b)  # the rank that keeps the block keeps its gathered weight
    assert plain.kept_move_bytes(w, R, S(0)) == (0, 0) and plain.kept_move_bytes(graph["layer_norm"], S(0), R) == (0, 0)

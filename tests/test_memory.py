"""Memory is a hard constraint: plans fit every device, state is sharded unevenly where
cards differ, and a model that cannot fit gets an error naming the rank and the bytes."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

from hap.api import plan_graph
from hap.capture import capture
from hap.cluster import load_cluster
from hap.errors import InfeasiblePlan
from tests.helpers import ROOT

MIXED = ROOT / "profiles" / "clusters" / "v100-a100-mem.toml"  # 4 x V100-16GB + 4 x A100-80GB


class Wide(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x.pow(2).mean()


def meta_graph(width: int, depth: int, batch: int = 64):
    with torch.device("meta"):
        model = Wide(width, depth)
        x = torch.randn(batch, width)
    return capture(model, (x,))


def test_model_too_big_for_16gb_replicated_gets_an_uneven_sharded_plan():
    # 4 x 16384^2 fp32 = 4.3 GB of weights; with Adam (weights, grads, 2 moments) 17 GB replicated
    graph = meta_graph(16384, 4)
    cluster = load_cluster(MIXED)
    plan = plan_graph(graph, cluster, optimizer="adam")
    assert plan.baselines["dp_even"].feasible is False  # data parallelism does not fit a V100
    for r in range(cluster.num_ranks):
        assert plan.predicted.memory_bytes[r] <= cluster.memory_bytes(r)
    sharded = [n.name for n in graph.params() if plan.nodes[n.name].output.startswith("S")]
    assert sharded, "parameters must be sharded to fit"
    mem = plan.predicted.memory_bytes
    assert len(set(round(m) for m in mem)) > 1, f"state should be sharded unevenly: {mem}"
    assert min(mem) > 0.05 * max(mem), "every card holds a real part of the state"


def test_model_that_cannot_fit_names_rank_bytes_and_fixes():
    graph = meta_graph(32768, 12)  # 51 GB of weights, 206 GB with Adam: more than the 8 cards have
    with pytest.raises(InfeasiblePlan) as e:
        plan_graph(graph, load_cluster(MIXED), optimizer="adam")
    msg = str(e.value)
    assert "rank" in msg and "GB" in msg and "parameters" in msg and "optimizer" in msg and "Try:" in msg


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Deep(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.pow(2).mean()


def test_activations_of_one_sample_over_a_card_fit_by_recomputing_the_fewest_blocks():
    # 8 sequences of 16k tokens on 8 V100s: one sample per card, so micro-batches cannot help;
    # a block keeps its input and relu's output for backward, 5 x 16k x 1024 x 4 B = 0.34 GB of
    # activations; 48 blocks 16 GB
    from rich.console import Console

    from hap.report import plan_text, strategy_table

    with torch.device("meta"):
        graph = capture(Deep(1024, 48), (torch.randn(8, 16384, 1024),))
    cluster = load_cluster(ROOT / "profiles" / "clusters" / "v100x8.toml")
    with pytest.raises(InfeasiblePlan):
        plan_graph(graph, cluster, recompute="none")
    plan = plan_graph(graph, cluster)
    assert not plan.micro_batches or max(plan.micro_batches) == 1
    assert 0 < len(plan.recompute) < 48 and plan.recompute[0] == "blocks.0"
    for r in range(cluster.num_ranks):
        assert plan.predicted.memory_bytes[r] <= cluster.memory_bytes(r)
    assert f"activation checkpointing: {len(plan.recompute)} of 48 blocks" in plan_text(plan)
    buf = io.StringIO()
    Console(file=buf, width=200).print(strategy_table(plan, max_rows=1000))
    text = buf.getvalue()
    assert "blocks.0.fc1 (recomputed)" in text and f"blocks.{len(plan.recompute)}.fc1 (recomputed)" not in text
    # recomputing costs a forward of each recomputed block again: more compute than all blocks kept
    everything = plan_graph(graph, cluster, recompute="all")
    assert everything.predicted.critical_compute_s > plan.predicted.critical_compute_s


def test_ranks_with_room_keep_the_activations_that_the_others_recompute():
    # 12 sequences of 16k tokens on 4 V100-16GB + 4 A100-80GB: a V100 must recompute most blocks
    # to fit, an A100 has the room to keep them all and skip that forward again
    import dataclasses

    from hap.cost import CostSetup
    from hap.plan import Plan
    from hap.report import plan_text
    from hap.solve import evaluate

    with torch.device("meta"):
        graph = capture(Deep(1024, 48), (torch.randn(12, 16384, 1024),))
    cluster = load_cluster(MIXED)
    plan = plan_graph(graph, cluster)
    v100, a100 = range(4), range(4, 8)
    assert plan.recompute and plan.recompute_counts == (len(plan.recompute),) * 4 + (0,) * 4
    for r in range(cluster.num_ranks):
        assert plan.predicted.memory_bytes[r] <= cluster.memory_bytes(r)
    assert min(plan.predicted.memory_bytes[r] for r in a100) > 2 * max(plan.predicted.memory_bytes[r] for r in v100)
    assert "ranks 0..3: 29; ranks 4..7: 0".replace("29", str(len(plan.recompute))) in plan_text(plan)
    assert Plan.from_json(plan.to_json()).recompute_counts == plan.recompute_counts
    # the same placements with every rank recomputing: the A100s compute more
    every = CostSetup.of_plan(dataclasses.replace(plan, recompute_counts=())).cost_model(graph, cluster)
    ev = evaluate(graph, every, plan.choice())
    assert all(ev.compute_s[r] > plan.predicted.compute_s[r] * 1.05 for r in a100)
    assert all(ev.compute_s[r] == pytest.approx(plan.predicted.compute_s[r]) for r in v100)

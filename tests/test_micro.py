"""Micro-batches: which sizes follow the batch, how a step's share is cut, and the planner's
choice of micro-batches per rank where memory is tight."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from hap.api import plan_graph, plan_spec
from hap.capture import capture
from hap.cluster import load_cluster
from hap.errors import InfeasiblePlan
from hap.runtime import micro
from hap.spec import capture_spec, load_spec
from tests.helpers import ROOT, emitted_layout

CLUSTERS = ROOT / "profiles" / "clusters"
MIXED = CLUSTERS / "v100-a100-mem.toml"  # 4 x V100-16GB + 4 x A100-80GB


def test_sizes_that_follow_the_batch_are_found_by_capturing_twice():
    g = capture_spec(load_spec(str(ROOT / "examples/gpt.py")))
    assert g.batch_size == 16
    idx = next(n for n in g if n.kind == "input" and n.target == "0")
    assert idx.batch_dims == [[1, 0], [0, 32]]  # [B, T] = [1*B + 0, 0*B + 32]: B follows the batch, T does not
    assert all(not any(f for f, _ in n.batch_dims) for n in g.params())
    # q.view(b, t, h, c // h): the b argument is B, the rest are fixed
    view = g["view"]
    assert view.batch_args == {"1.0": [1, 0]}
    # logits.view(-1, vocab) -> [B*T, vocab]: T rows per sample
    flat = next(n for n in g if n.target == "aten.view.default" and n.out.ndim == 2 and n.out.shape[1] == 256)
    assert flat.batch_dims[0] == [32, 0]


def test_a_model_that_does_not_capture_at_twice_the_batch_stays_unclassified(tmp_path):
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(4, 4)

        def forward(self, x):
            torch._check(x.shape[0] == 8)  # a model written for one batch size only
            return self.w(x.reshape(8, 4)).sum()

    g = capture(FixedBatch(), (torch.randn(8, 4),))
    assert g.batch_size == 0
    plan = plan_graph(g, load_cluster(CLUSTERS / "cpu-1-2-4.toml"))
    text = plan.emit(tmp_path, spec=str(ROOT / "examples/mlp.py")).read_text()
    # train.py refuses micro-batches
    assert emitted_layout(text).fixed_batch[0].startswith("the model did not capture at twice the batch")


def test_a_step_share_is_cut_into_even_pieces_and_reassembled_in_order():
    assert micro.pieces(10, 3) == (4, 3, 3)
    assert micro.pieces(2, 4) == (1, 1, 0, 0)
    # lockstep: every rank runs as many micro-batches; a small share gets empty ones
    assert micro.schedule((10, 2), (3, 1), lockstep=True) == [(4, 1), (3, 1), (3, 0)]
    # data parallel: each rank its own count, never an empty micro-batch of its own
    rows = micro.schedule((10, 2), (1, 3), lockstep=False)
    assert rows == [(10, 1), (0, 1)]
    assert micro.runs(rows, 0, lockstep=False) == [0] and micro.runs(rows, 1, lockstep=False) == [0, 1]
    shares, counts = (5, 3), (2, 2)
    rows = micro.schedule(shares, counts, lockstep=True)
    full = torch.arange(8).unsqueeze(1)  # the global batch: rank 0 takes 0..4, rank 1 takes 5..7
    got_sharded = [[], []]
    for j in range(len(rows)):
        for r in range(2):
            local = full[sum(shares[:r]):sum(shares[:r + 1])]
            sharded, replicated = micro.take([local, full], [0, None], shares, rows, j, r)
            got_sharded[r].append(sharded)
            # a replicated input holds every rank's piece of this micro-batch, in rank order
            assert replicated.shape[0] == sum(rows[j])
            assert torch.equal(replicated[:rows[j][0]], micro.take([full[:5]], [0], shares, rows, j, 0)[0])
    for r in range(2):
        assert torch.equal(torch.cat(got_sharded[r]), full[sum(shares[:r]):sum(shares[:r + 1])])


def test_the_emitted_forward_writes_batch_sizes_in_terms_of_rows(tmp_path):
    plan = plan_spec(str(ROOT / "examples/mlp.py"), str(CLUSTERS / "cpu-slow-net.toml"), stages=1)
    text = plan.emit(tmp_path, spec=str(ROOT / "examples/mlp.py")).read_text()
    assert plan.moves, "the plan reshards (tensor parallel): its collectives must follow the micro-batch"
    assert "hr.reduce_scatter(linear_3, 0, ROWS" in text  # the batch dim's lengths
    assert "LENGTHS[256, 1]" in text  # the hidden dim keeps the plan's split
    layout = emitted_layout(text)
    assert layout.fixed_batch == () and layout.lockstep


class Wide(nn.Module):
    def __init__(self, width: int, depth: int, norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.BatchNorm1d(width) if norm else None

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        if self.norm is not None:
            x = self.norm(x)
        return x.pow(2).mean()


def meta_graph(batch: int, norm: bool = False):
    with torch.device("meta"):
        model = Wide(1024, 8, norm)
        x = torch.randn(batch, 1024)
    return capture(model, (x,))


def test_activations_that_overfill_a_small_card_fit_in_micro_batches_there_only():
    # 4M samples x 8 layers x 4 KB of saved activations (relu keeps its output, a linear its input):
    # a V100's speed share (~468k samples) keeps
    # ~15 GB of activations, over its 16 GB with the rest; an A100 fits its larger share whole
    graph = meta_graph(2 ** 22)
    cluster = load_cluster(MIXED)
    with pytest.raises(InfeasiblePlan):  # without micro-batches (sizes not known to follow the batch)
        plan_graph(dataclasses.replace(graph, batch_size=0), cluster)
    plan = plan_graph(graph, cluster)
    v100 = [r for r in range(cluster.num_ranks) if cluster.ranks[r].device.startswith("V100")]
    a100 = [r for r in range(cluster.num_ranks) if cluster.ranks[r].device.startswith("A100")]
    assert all(plan.micro_batches[r] > 1 for r in v100) and all(plan.micro_batches[r] == 1 for r in a100)
    for r in range(cluster.num_ranks):
        assert plan.predicted.memory_bytes[r] <= cluster.memory_bytes(r)
    # compute share is not memory share: a V100 keeps a share near its speed share and cuts it up
    assert plan.shares[v100[0]] * plan.micro_batches[v100[0]] > plan.shares[a100[0]]
    said = [n for n in plan.notes if "micro-batches" in n]
    assert said and len(said) <= len(v100) and "to fit" in said[0]  # alike ranks share a note
    assert not plan.warnings


def test_micro_batches_over_batch_norm_are_warned_about():
    plan = plan_graph(meta_graph(2 ** 22, norm=True), load_cluster(MIXED))
    assert max(plan.micro_batches) > 1
    assert any("couples the samples" in w for w in plan.warnings), plan.warnings


def test_ranks_of_one_device_with_the_same_share_and_count_share_one_note():
    from hap.search import micro_batch_notes

    cluster = load_cluster(MIXED)  # ranks 0-3 V100-16GB, 4-7 A100-80GB
    notes = micro_batch_notes(cluster, (5, 5, 5, 4, 11, 11, 11, 11), (3, 3, 3, 2, 1, 1, 1, 1))
    assert len(notes) == 2, notes
    assert notes[0].startswith("ranks 0..2 (V100-16GB) run their 5 samples in 3 micro-batches of at most 2")
    assert notes[1].startswith("rank 3 (V100-16GB) runs its 4 samples in 2 micro-batches of at most 2")

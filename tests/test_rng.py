"""Random ops across ranks (hap.runtime.rng): each rank's part of a sharded random op comes
from its own stream, a replicated one is drawn alike on every rank, and both depend only on
(seed, step, micro-batch), so a resumed run draws what an uninterrupted one drew."""
from __future__ import annotations

import torch

from hap.api import plan_graph
from hap.capture import capture
from hap.cluster import load_cluster
from hap.runtime.rng import replicated_random, seed_step
from hap.spec import load_spec
from tests.helpers import ROOT, emitted_layout

DROP = torch.ops.aten.dropout.default


def test_each_rank_draws_its_own_stream_and_replicated_draws_agree():
    x = torch.ones(64, 64)
    masks, shared = [], []
    for rank in range(2):
        seed_step(0, step=5, rank=rank)
        masks.append(DROP(x, 0.5, True))
        shared.append(replicated_random("dropout_1", DROP, x, 0.5, True))
        again = replicated_random("dropout_1", DROP, x, 0.5, True)  # activation checkpointing's recompute
        assert torch.equal(again, shared[-1])
    assert not torch.equal(masks[0], masks[1])  # the ranks' parts are not the same mask twice
    assert torch.equal(shared[0], shared[1])  # every rank holds the same replicated values
    seed_step(0, step=5, rank=0)
    assert torch.equal(DROP(x, 0.5, True), masks[0])  # a function of (seed, step, rank): resumable
    seed_step(0, step=6, rank=0)
    assert not torch.equal(DROP(x, 0.5, True), masks[0])
    seed_step(0, step=5, rank=1)
    on_cpu = replicated_random("dropout_1", DROP, x, 0.5, True, on_cpu=True)  # a CPU tensor: drawn as before
    assert torch.equal(on_cpu, shared[0])


def test_a_replicated_dropout_is_emitted_to_draw_alike_on_every_rank(tmp_path):
    spec = load_spec(str(ROOT / "tests/models/dropout_mlp.py"))
    graph = capture(spec.model(), spec.batch(0, spec.BATCH_SIZE))
    plan = plan_graph(graph, load_cluster(ROOT / "profiles/clusters/cpu-slow-net.toml"),
                      pins={"p_fc1_weight": "R", "p_fc2_weight": "S(0)"})
    text = plan.emit(tmp_path, spec=str(ROOT / "tests/models/dropout_mlp.py")).read_text()
    drops = [n for n in graph.ops() if "dropout" in n.target]
    for n in drops:
        line = next(x for x in text.splitlines() if x.strip().startswith(f"{n.name} = "))
        replicated = not plan.nodes[n.name].output.startswith("S")
        assert ("hr.replicated_random(" in line) == replicated, line
    assert any(not plan.nodes[n.name].output.startswith("S") for n in drops)
    assert emitted_layout(text).random_on_cpu is False

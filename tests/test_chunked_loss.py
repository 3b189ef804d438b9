"""A cross-entropy over a wide class dim runs a chunk of rows at a time (hap.rules.loss.chunked_losses,
hap.runtime.chunked_loss): each row's gradient is the whole computation's bit for bit, the plan
counts the logits once, and the program writes no line for the casts and views in between."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hap.cost
import hap.runtime.chunked_loss as chunked
from hap.cluster import load_cluster
from hap.cost import CostSetup
from hap.emit import Emitter
from hap.rules.loss import chunked_losses
from hap.solve import memory_report
from tests.helpers import ROOT, captured, load_example


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("rows", [0, 1, 21])
def test_every_rows_gradient_is_the_whole_losss_bit_for_bit(precision, rows, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4 * 50)  # chunks of 4 rows
    monkeypatch.setattr(chunked, "CHUNKED_ABOVE", 2 * 4 * 50)  # 21 rows run in chunks, 1 row whole
    autocast = precision == "bf16"
    torch.manual_seed(0)
    hidden, weight = torch.randn(rows, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    target = torch.randint(0, 50, (rows,))
    target[::5] = -100  # ignored rows
    grads, losses = [], []
    for run in (lambda lg: F.cross_entropy(lg.float().view(-1, 50), target, reduction="sum"),
                lambda lg: chunked.chunked_cross_entropy(lg, target, -100, torch.float32)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = F.linear(hidden, weight)  # bf16 under autocast, as a model's head makes them
            loss = run(logits)
        grads.append(torch.autograd.grad(loss, [hidden, weight]))
        losses.append(loss.detach())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert torch.equal(run(F.linear(hidden, weight)), loss.detach())  # evaluation sums alike
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)


def test_a_language_models_plan_counts_its_logits_once_and_its_program_chunks_the_loss(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(hap.cost, "CHUNK_ELEMENTS", 512)  # the tiny model's logits: several chunks a rank
    monkeypatch.setattr(hap.cost, "CHUNKED_ABOVE", 512)
    monkeypatch.setenv("HAP_HF_MODEL", "llama")
    graph = captured(load_example("hf_usage"))[2]
    found = chunked_losses(graph)
    assert list(found) == [graph.loss]
    c = found[graph.loss]  # HF's loss: logits.float(), then a view
    assert graph[c.logits].target == "aten.linear.default" and len(c.chain) == 2

    from hap.api import plan_graph
    cluster = load_cluster(ROOT / "profiles" / "clusters" / "cpu-1-2-4.toml")
    plan = plan_graph(graph, cluster, precision="bf16")
    graph = plan.graph  # as autocast runs it: the logits in bf16, cast to fp32 for the loss
    cm = CostSetup.of_plan(plan).cost_model(graph, cluster)
    working = [r for r, share in enumerate(plan.shares) if share]
    assert [cm.chunked_on[c.loss][r] for r in working] == [True] * len(working)
    choice = plan.choice()
    logits = cm.memory_parts(graph[c.logits], choice[c.logits])["activations"]
    assert all(logits[r] for r in working)  # kept for backward
    assert not any(a for x in c.chain for a in cm.memory_parts(graph[x], choice[x])["activations"])
    counted = memory_report(graph, cm, plan.choice())
    monkeypatch.setattr(hap.cost, "chunked_losses", lambda g: {})
    whole = memory_report(graph, CostSetup.of_plan(plan).cost_model(graph, cluster), plan.choice())
    copy = graph[c.chain[0]].out.nbytes  # the fp32 copy of the logits
    assert graph[c.chain[0]].out.dtype == "float32" and graph[c.logits].out.dtype == "bfloat16"
    for r, share in enumerate(plan.shares):
        # computed whole, the loss keeps the fp32 copy (4 bytes a logit); chunked, the bf16 logits
        # (2 bytes) and one chunk's fp32 temporaries
        assert whole[r]["activations"] - counted[r]["activations"] >= copy / 2 * share / sum(plan.shares) - 16 * 512

    lines = Emitter(plan).forward_lines()
    assert sum("hr.chunked_cross_entropy(" in line for line in lines) == 1
    assert not any(line.lstrip().startswith(f"{x} =") for x in c.chain for line in lines)


def test_logits_read_elsewhere_are_not_chunked():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 32)

        def forward(self, x, t):
            logits = self.fc(x)
            return F.cross_entropy(logits.view(-1, 32), t.view(-1)) + logits.pow(2).mean()

    from hap.capture import capture
    graph = capture(Head(), (torch.randn(4, 3, 8), torch.randint(0, 32, (4, 3))))
    assert chunked_losses(graph) == {}

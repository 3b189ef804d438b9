"""Token-wise module calls (hap.rules.token_wise): transformers' experts run on each rank's own
tokens; the router's load-balancing loss turns micro-batches off; ops that cannot be written
into train.py are refused at capture."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hap.capture import capture
from hap.errors import CaptureError
from hap.placement import Splitter
from hap.rules import RuleContext, view_units
from hap.rules.token_wise import EXPERTS, ROWS, token_wise_candidates
from hap.solve import all_candidates
from tests.helpers import captured, check_all_candidates, load_example, run_graph

ROUTING = {"aten.sort.default", "aten.index.Tensor", "aten.histc.default", "aten.index_put_.default",
           "transformers.grouped_mm_fallback.default"}


@pytest.fixture
def moe_graph(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HAP_HF_MODEL", "qwen2_moe")
    monkeypatch.setenv("HAP_HF_ROUTER_LOGITS", "1")
    return captured(load_example("hf_usage"), batch_size=6)


def test_every_op_of_an_experts_call_runs_on_the_ranks_rows(moe_graph):
    _, _, graph = moe_graph
    experts = [n for n in graph.ops() if n.token_wise]
    assert {n.token_wise for n in experts} == {f"model.model.layers.{i}.mlp.experts" for i in range(2)}
    assert ROUTING <= {n.target for n in experts}
    cands = all_candidates(graph, RuleContext(graph, Splitter((3, 2, 1)), view_units(graph)))
    assert all([c.name for c in cands[n.name]] == [ROWS, EXPERTS] for n in experts)
    users = graph.users()
    for n in experts:
        c, ep = cands[n.name]
        weights = [i for i in n.inputs() if graph[i].kind == "param"]
        assert all(str(p) == "S(0)" for i, p in zip(n.inputs(), ep.inputs) if i in weights)  # experts stay sharded
        assert ep.emit == ("experts" if any(not graph[u].token_wise for u in users[n.name]) else "elided")
        if any(not graph[u].token_wise for u in users[n.name]):  # what leaves the call is a true shard
            assert str(c.output) == "S(0)", (n.name, c)
        if n.target == "transformers.grouped_mm_fallback.default":
            assert [str(p) for p in c.inputs] == ["S(0)", "R", "R"] and c.split == (n.out.shape[0], 1)
        if n.target == "aten.arange.default":  # arange(tokens * top_k): the rank's own count
            assert c.rewrite and c.rewrite[0][1].batch == (graph[n.name].batch_dims[0][0], 0)


def test_an_experts_call_without_batch_sizes_runs_replicated_and_says_why(moe_graph):
    _, _, graph = moe_graph
    unclassified = dataclasses.replace(graph, batch_size=0)
    rows, refused = token_wise_candidates(unclassified)
    assert not rows and set(refused) == {f"model.model.layers.{i}.mlp.experts" for i in range(2)}
    assert all("twice the batch" in why for why in refused.values())


def test_the_load_balancing_loss_turns_micro_batches_off(moe_graph, monkeypatch):
    _, _, graph = moe_graph
    assert graph.batch_products(), "the router loss multiplies two whole-batch statistics"
    monkeypatch.setenv("HAP_HF_ROUTER_LOGITS", "0")
    _, _, plain = captured(load_example("hf_usage"), batch_size=6)
    assert not plain.batch_products(), "a mean loss is a sum over samples"


@pytest.mark.parametrize("shares", [(4, 2), (3, 0, 3)])
def test_every_per_op_candidate_of_the_moe_is_exact(moe_graph, shares):
    """histc of a sharded input is P; the other routing ops keep their own candidates here."""
    model, batch, graph = moe_graph
    values = run_graph(graph, model, batch)
    assert torch.allclose(values[graph.loss], model(*batch))
    checked, errors = check_all_candidates(graph, values, shares)
    assert checked > len(graph.ops())
    assert not errors, "\n".join(errors[:10])


def test_an_op_train_py_cannot_call_is_refused_at_capture_with_its_line():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: t * 3, (self.lin(x),))
            return y.sum()

    with pytest.raises(CaptureError) as e:
        capture(Branchy(), (torch.randn(2, 4),))
    text = str(e.value)
    assert "'cond'" in text and "higher-order op" in text and "test_token_wise.py" in text and "fix:" in text

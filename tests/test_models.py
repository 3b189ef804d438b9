"""The model-coverage examples (HAP's evaluation models, a DLRM recommender and
HuggingFace transformers) capture, their captured graph computes the model's loss, and
they plan on the default cluster with the plan invariants hapcheck checks."""
from __future__ import annotations

import pytest
import torch

import hap
from tests.helpers import captured, load_example, run_graph

EXAMPLES = ["vgg19", "vit", "bert", "bert_moe", "dlrm"]
HF_EXAMPLES = ["hf_gpt2", "hf_bert", "hf_llama"]


@pytest.mark.parametrize("example", EXAMPLES + HF_EXAMPLES)
def test_example_captures_and_plans(example):
    if example in HF_EXAMPLES:
        pytest.importorskip("transformers")
    mod = load_example(example)
    for name in ("model", "batch", "BATCH_SIZE"):
        assert hasattr(mod, name), f"{example} lacks {name} (model spec protocol)"
    model, batch, graph = captured(mod)
    # deterministic, seed-independent batches with the samples on dim 0
    again = mod.batch(0, mod.BATCH_SIZE)
    assert all(torch.equal(a, b) for a, b in zip(batch, again))
    assert all(x.shape[0] == mod.BATCH_SIZE for x in batch)
    assert not all(torch.equal(a, b) for a, b in zip(batch, mod.batch(1, mod.BATCH_SIZE)))
    values = run_graph(graph, model, batch)
    loss = model(*batch)
    assert torch.isfinite(loss)
    assert torch.allclose(values[graph.loss], loss), "the captured graph must compute the model's loss"

    plan = hap.synthesize(model, batch, cluster="profiles/clusters/default.toml", time_limit_s=10)
    plan.lint()
    assert len(plan.shares) == 2 and min(plan.shares) >= 0 and sum(plan.shares) == mod.BATCH_SIZE
    assert set(plan.nodes) == {n.name for n in plan.graph}
    best_baseline = min(b.predicted_step_s for b in plan.baselines.values())
    assert {"dp_even", "dp_proportional"} <= set(plan.baselines)
    assert plan.predicted_step_s <= best_baseline * 1.0001
    assert 0 < plan.lower_bound_step_s <= plan.predicted_step_s * 1.0001


def test_moe_experts_follow_the_environment(monkeypatch):
    monkeypatch.setenv("HAP_MOE_EXPERTS", "6")
    mod = load_example("bert_moe")
    assert mod.EXPERTS == 6
    moe = next(m for m in mod.model().modules() if type(m).__name__ == "MoE")
    assert moe.w1.shape[0] == 6 and moe.gate.out_features == 6


def test_paper_sizes_are_selected_by_the_environment(monkeypatch):
    monkeypatch.setenv("HAP_SIZE", "paper")
    vit, bert = load_example("vit"), load_example("bert")
    assert (vit.LAYERS, vit.DIM, vit.HEADS, vit.PATCH) == (12, 768, 12, 4)
    assert (bert.LAYERS, bert.DIM, bert.HEADS, bert.SEQ) == (12, 768, 12, 128)
    assert load_example("vgg19").HIDDEN == 4096

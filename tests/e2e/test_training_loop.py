"""The training loop users expect, exact on uneven shards: AdamW with decoupled weight decay,
warm-up and cosine schedule, and clipping by the whole model's gradient norm on a plan that
shards weights (a program that clipped each shard by its own norm would differ)."""
from __future__ import annotations

import json

import pytest

from tests.e2e.harness import ROOT, run_exact

CLUSTERS = ROOT / "profiles" / "clusters"
MEGATRON = {"p_hidden_1_weight": "S(0)", "p_hidden_1_bias": "S(0)", "p_hidden_2_weight": "S(1)"}
FLAGS = ["--optimizer", "adamw", "--weight-decay", "1.0", "--clip-grad-norm", "0.05", "--warmup-steps", "2",
         "--schedule", "cosine"]
SAME = {"optimizer": "adamw", "weight_decay": 1.0, "clip": 0.05, "warmup": 2, "schedule": "cosine"}


@pytest.mark.parametrize("cluster,pins", [("default", MEGATRON), ("cpu-1-2-4", None)])
def test_adamw_cosine_and_global_norm_clipping_are_exact(cluster, pins, tmp_path, monkeypatch):
    monkeypatch.setenv("HAP_MLP_WIDTH", "512")
    monkeypatch.setenv("HAP_MLP_BATCH", "256")
    plan, loss_err, param_err = run_exact(str(ROOT / "examples/mlp.py"), str(CLUSTERS / f"{cluster}.toml"), tmp_path,
                                          steps=5, lr=1e-3, pins=pins, train=SAME, train_args=FLAGS)
    assert len(set(plan.shares)) > 1
    if pins:
        assert plan.nodes["p_hidden_1_weight"].output == "S(0)"
    log = json.loads((tmp_path / "log.json").read_text())
    assert min(log["grad_norm"]) > 0.05, log["grad_norm"]  # the clipping was active every step
    assert log["lr"][:2] == pytest.approx([5e-4, 1e-3]) and log["lr"][-1] < log["lr"][2]
    assert loss_err < 1e-5 and param_err < 1e-4, (loss_err, param_err)

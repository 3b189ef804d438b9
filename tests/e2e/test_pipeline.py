"""Pipelined plans (hap.pipeline) train exactly what one device trains: two stages of different
widths (one rank, then two with uneven shares), the GPT's tied embedding and head held by both
and summed across them, micro-batches split differently by each stage, and clipping by the
whole model's norm."""
from __future__ import annotations

import json

import pytest

from tests.e2e.harness import ROOT, run_exact

CLUSTERS = ROOT / "profiles" / "clusters"


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 2e-2), ("fp16", 2e-2)])
def test_two_stages_of_different_widths_train_exactly(precision, tol, tmp_path):
    plan, loss_err, param_err = run_exact(str(ROOT / "examples/gpt.py"), str(CLUSTERS / "cpu-1-2-4.toml"), tmp_path,
                                          steps=3, stages=2, precision=precision, train={"clip": 0.05},
                                          train_args=["--clip-grad-norm", "0.05", "--micro-batches", "4"])
    assert [len(st.ranks) for st in plan.stages] in ([1, 2], [2, 1])
    assert [st.blocks for st in plan.stages] == [("blocks.0",), ("blocks.1",)]
    two = next(st for st in plan.stages if len(st.ranks) == 2)
    assert len(set(two.plan.shares)) == 2  # uneven shares inside a stage
    text = (tmp_path / "out" / "train.py").read_text()
    assert "shared=((('tok.weight', 'head.weight'), (0, 1)),)" in text  # the tied weight, in both stages
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["stages"] == [list(st.ranks) for st in plan.stages] and log["micro_batches"] == 4
    assert min(log["grad_norm"]) > 0.05  # the clipping was active every step
    assert loss_err < tol and param_err < tol, (loss_err, param_err)


def test_the_planner_picks_two_stages_where_the_network_binds_and_they_train_exactly(tmp_path):
    # two one-rank nodes joined at 0.1 Gbit/s: the gradient all-reduce would take most of the
    # step, so "auto" cuts the GPT between its blocks, one stage per node
    plan, loss_err, param_err = run_exact(str(ROOT / "examples/gpt.py"), str(CLUSTERS / "cpu-slow-net.toml"), tmp_path,
                                          steps=3)
    assert [st.ranks for st in plan.stages] == [(0,), (1,)]
    assert plan.predicted_step_s < plan.baselines["hap_1_stage"].predicted_step_s
    assert loss_err < 1e-4 and param_err < 1e-4, (loss_err, param_err)

"""Re-balancing while training runs: a rank slowed mid-run (emulated) gets fewer samples from
a step boundary on, and training stays exactly what one device trains (the global batch never
changes) — for a synthetic-batch spec, and for a dataset spec whose ranks then read only
their new shares."""
from __future__ import annotations

import json

import pytest

from tests.e2e.harness import ROOT, run_exact

CLUSTERS = ROOT / "profiles" / "clusters"


@pytest.mark.parametrize("spec,cluster,extra", [
    # a character GPT from a dataset spec: its views of the batch dim follow the new shares
    # (LENGTHS), and each rank reads its new share. Two ranks on this 2-core machine: with three,
    # the emulation's busy waiting takes cores from the others and blurs what each rank measures
    ("examples/chargpt.py", "default", ["--prefetch", "0"]),
    ("examples/mlp.py", "default", []),  # a synthetic-batch spec
])
def test_a_slowed_rank_is_rebalanced_and_training_stays_exact(spec, cluster, extra, tmp_path, monkeypatch):
    monkeypatch.setenv("HAP_MLP_WIDTH", "512")  # compute-bound enough that the slowdown shows
    # rank 0 becomes 8x slower: a gain far above the 10% threshold, whatever else the machine runs
    monkeypatch.setenv("HAP_MLP_BATCH", "256")
    plan, loss_err, param_err = run_exact(str(ROOT / spec), str(CLUSTERS / f"{cluster}.toml"), tmp_path, steps=10,
                                          train_args=["--emulate", "--slowdown-at", "2:0:8", *extra])
    log = json.loads((tmp_path / "log.json").read_text())
    events = log["rebalance"]
    assert all(sum(e["shares"]) == plan.global_batch for e in events)
    assert any(e["step"] <= 9 and e["shares"][0] < plan.shares[0] for e in events), (plan.shares, events)
    # 8x slower than at the start: beyond moving samples, the program suggests a new plan
    assert log["advice"] and "re-plan" in log["advice"][0] and "--resume" in log["advice"][0]
    assert loss_err < 1e-5 and param_err < 1e-5, (loss_err, param_err)


def test_a_plan_that_shards_weights_moves_its_shards_when_it_rebalances(tmp_path, monkeypatch):
    # Megatron-style weights sharded along the share ratio: a re-balancing re-cuts every sharded
    # weight and its momentum to the new ratio, in memory, and the collectives follow (SGD with
    # momentum: Adam would turn the rounding noise of this MLP's dead units into lr-sized steps)
    from hap.runtime.checkpoint import read_meta
    from hap.runtime.shares import split_lengths

    monkeypatch.setenv("HAP_MLP_WIDTH", "512")
    monkeypatch.setenv("HAP_MLP_BATCH", "256")
    pins = {"p_hidden_1_weight": "S(0)", "p_hidden_1_bias": "S(0)", "p_hidden_2_weight": "S(1)"}
    plan, loss_err, param_err = run_exact(
        str(ROOT / "examples/mlp.py"), str(CLUSTERS / "default.toml"), tmp_path, steps=10, pins=pins,
        train={"momentum": 0.9},
        train_args=["--momentum", "0.9", "--emulate", "--slowdown-at", "2:0:8", "--save", str(tmp_path / "ck")])
    assert plan.nodes["p_hidden_1_weight"].output == "S(0)" and plan.moves
    events = json.loads((tmp_path / "log.json").read_text())["rebalance"]
    assert events and events[0]["shares"][0] < plan.shares[0], (plan.shares, events)
    assert loss_err < 1e-5 and param_err < 1e-4, (loss_err, param_err)
    meta = read_meta(tmp_path / "ck")  # the last checkpoint holds the shards as cut at the end
    assert meta["shares"] == events[-1]["shares"]  # the shares the next step would run
    # a re-balancing decided in the last steps may apply only after step 10, the run's end: the
    # shards are cut as the last step ran them
    ran = [e for e in events if e["step"] < 10][-1]["shares"]
    assert meta["layout"]["hidden.1.weight"]["lengths"] == list(split_lengths(512, 1, ran))

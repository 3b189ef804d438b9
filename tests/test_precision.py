"""Precision as a planning choice: what auto picks per cluster and why, the graph's dtypes
under autocast, and plans that price compute, activations and resharding in that dtype."""
from __future__ import annotations

import json

import pytest

from hap.api import plan_graph
from hap.cli import main as hap_plan
from hap.cluster import load_cluster
from hap.cost import CostSetup
from hap.errors import HapError
from hap.plan import Plan
from hap.precision import autocast_graph, choose, training_graph
from hap.solve import evaluate
from tests.helpers import ROOT, captured, load_example

CLUSTERS = ROOT / "profiles" / "clusters"


@pytest.mark.parametrize("cluster,want", [
    ("a100-l4", "bf16"),    # every device has bf16 tensor cores
    ("hap-paper", "fp16"),  # V100 + P100: no fast bf16, fast fp16
    ("default", "bf16"),    # this project's CPU (AVX512-BF16) runs bf16 at 2.1x fp32, fp16 at 0.06x
])
def test_auto_picks_the_fastest_dtype_every_device_runs_at_speed(cluster, want):
    got, why = choose(load_cluster(CLUSTERS / f"{cluster}.toml"), "auto")
    assert got == want and want in why


def test_the_faster_precision_note_prices_the_plan_under_its_own_setup():
    # every block recomputed: the fp16 step the note predicts recomputes them too
    cluster = load_cluster(CLUSTERS / "hap-paper.toml")
    plan = plan_graph(captured(load_example("gpt"))[2], cluster, recompute="all", time_limit_s=10, stages=1)
    note = next(n for n in plan.notes if n.startswith("--precision auto"))
    low = training_graph(plan.graph, choose(cluster, "auto")[0])
    step = evaluate(low, CostSetup.of_plan(plan).cost_model(low, cluster), plan.choice()).step_s
    assert plan.recompute and f"predicts {step * 1e3:.2f} ms per step" in note


def test_auto_falls_back_to_fp32_and_names_the_device_that_is_slow():
    cl = load_cluster(CLUSTERS / "default.toml")
    slow = {name: p.__class__(**{**p.__dict__, "flop_per_s": {"matmul": {"fp32": 1e11, "bf16": 1e10, "fp16": 5e9}}})
            for name, p in cl.devices.items()}
    import dataclasses

    got, why = choose(dataclasses.replace(cl, devices=slow), "auto")
    assert got == "fp32" and "cpu" in why
    assert choose(cl, "fp32")[0] == "fp32"
    with pytest.raises(HapError, match="fp32, bf16, fp16, auto"):
        choose(cl, "int8")


def test_autocast_graph_has_the_dtypes_the_program_meets():
    graph = captured(load_example("gpt"))[2]
    low = autocast_graph(graph, "bf16")
    assert low.precision == "bf16" and autocast_graph(graph, "fp32") is graph
    for node in low:
        was = graph[node.name]
        if node.kind == "param":
            assert node.meta.dtype == "float32"  # fp32 master weights
        elif node.target in ("aten.linear.default", "aten.scaled_dot_product_attention.default"):
            assert node.meta.dtype == "bfloat16" and node.bytes < was.bytes
    assert low[low.loss].meta.dtype == "float32"  # cross_entropy runs in fp32 under autocast
    assert [n.meta.shape for n in low if hasattr(n.meta, "shape")] == \
        [n.meta.shape for n in graph if hasattr(n.meta, "shape")]


def test_bf16_plan_computes_at_tensor_core_rates_and_keeps_fp32_state(monkeypatch):
    for k, v in dict(LAYERS=4, DIM=768, HEADS=12, SEQ=256, BATCH=32).items():
        monkeypatch.setenv(f"HAP_GPT_{k}", str(v))
    graph = captured(load_example("gpt"))[2]
    cluster = load_cluster(CLUSTERS / "a100-l4.toml")
    fp32, bf16 = plan_graph(graph, cluster, stages=1), plan_graph(graph, cluster, precision="bf16", stages=1)
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    # A100 and L4 run bf16 matmuls at 4-16x fp32; the step gains less: the 25 Gbit/s gradient
    # all-reduce stays fp32 and has less backward left to hide behind
    assert bf16.predicted.critical_compute_s < fp32.predicted.critical_compute_s / 2
    assert bf16.predicted_step_s < fp32.predicted_step_s
    assert bf16.baselines["dp_even"].predicted_step_s < fp32.baselines["dp_even"].predicted_step_s
    params = [n.name for n in graph.params()]
    assert all(bf16.graph[p].meta == fp32.graph[p].meta for p in params)  # fp32 master weights
    # the default recommends the faster choice with its prediction
    assert any("--precision auto would train in bf16" in n for n in fp32.notes)
    again = Plan.from_json(json.loads(json.dumps(bf16.to_json())))
    assert again.precision == "bf16" and again.to_json() == bf16.to_json()


def test_cli_precision_auto_reports_its_choice(capsys):
    assert hap_plan([str(ROOT / "examples/mlp.py"), "--cluster", str(CLUSTERS / "hap-paper.toml"),
                     "--precision", "auto", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["precision"] == "fp16"
    assert any(n.startswith("precision fp16: auto") for n in d["notes"])


def test_bf16_gradient_reduction_halves_the_bytes_on_the_wire():
    graph = captured(load_example("mlp"))[2]
    cluster = load_cluster(CLUSTERS / "cpu-slow-net.toml")
    pins = {p.name: "R" for p in graph.params()}  # data parallel: every gradient is all-reduced
    fp32 = plan_graph(graph, cluster, precision="bf16", pins=pins)
    half = plan_graph(graph, cluster, precision="bf16", grad_reduce="bf16", pins=pins)
    assert half.graph.grad_reduce == "bf16" and half.to_json()["grad_reduce"] == "bf16"
    # on a 0.1 Gbit/s network the all-reduce is bandwidth-bound: half the bytes, about half the
    # time (the per-message latency stays)
    assert 0.5 <= half.predicted.grad_sync_s / fp32.predicted.grad_sync_s < 0.6
    assert any("all-reduced in bf16" in n for n in half.notes)

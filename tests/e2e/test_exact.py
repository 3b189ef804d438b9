"""Emitted programs under real torchrun (gloo) train exactly what single-device training
trains: losses and parameters after 3 SGD steps, on uneven shares (1:3 and 1:2:4)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from hap.emit import emit_program
from tests.e2e.harness import ROOT, plan_for, run_exact, torchrun

CLUSTERS = ROOT / "profiles" / "clusters"
TOL = 1e-4


@pytest.mark.parametrize("spec,cluster", [
    ("examples/gpt.py", "cpu-1-2-4"),              # tied embeddings, SDPA, 3 uneven ranks
    ("tests/models/bn_cnn.py", "cpu-1-2-4"),       # BatchNorm with global statistics
    ("tests/models/moe.py", "default"),            # einsum / topk / one_hot gating, an op without a rule
    ("examples/cnn.py", "default"),
])
def test_exact(spec, cluster, tmp_path):
    plan, loss_err, param_err = run_exact(str(ROOT / spec), str(CLUSTERS / f"{cluster}.toml"), tmp_path)
    assert len(set(plan.shares)) > 1, f"shares should be uneven on {cluster}: {plan.shares}"
    assert loss_err < TOL and param_err < TOL, (loss_err, param_err)


def test_a_custom_op_of_the_users_own_runs_through_torch_ops(tmp_path):
    """A torch.library custom op with its fake kernel and autograd formula: written into train.py
    as torch.ops.haptest..., it runs (replicated, having no rule) and trains exactly."""
    plan, loss_err, param_err = run_exact(str(ROOT / "tests/models/custom_op.py"), str(CLUSTERS / "cpu-1-2-4.toml"),
                                          tmp_path)
    assert "torch.ops.haptest.shifted_softplus.default(" in (tmp_path / "out" / "train.py").read_text()
    assert any("haptest.shifted_softplus.default has no sharding rule" in w for w in plan.warnings), plan.warnings
    assert loss_err < TOL and param_err < TOL, (loss_err, param_err)


def test_forced_tensor_parallel_is_exact(tmp_path):
    """Megatron column- then row-parallel linears, forced, on 1:3 shares."""
    pins = {"p_hidden_1_weight": "S(0)", "p_hidden_1_bias": "S(0)", "p_hidden_2_weight": "S(1)"}
    plan, loss_err, param_err = run_exact(str(ROOT / "examples/mlp.py"), str(CLUSTERS / "default.toml"),
                                          tmp_path, pins=pins)
    assert plan.nodes["p_hidden_1_weight"].output == "S(0)"
    assert plan.nodes["p_hidden_2_weight"].output == "S(1)"
    assert any(m.kind in ("all_gather", "all_reduce", "reduce_scatter") for m in plan.moves)
    assert loss_err < TOL and param_err < TOL, (loss_err, param_err)


def test_slow_network_shards_parameters_and_is_exact(tmp_path):
    """On a 0.1 Gbit/s network the solver itself shards large layers instead of all-reducing them
    (on one stage: "auto" cuts the model into two stages there, tests/e2e/test_pipeline.py)."""
    plan, loss_err, param_err = run_exact(str(ROOT / "examples/mlp.py"), str(CLUSTERS / "cpu-slow-net.toml"),
                                          tmp_path, stages=1)
    sharded = [n for n, v in plan.nodes.items() if n.startswith("p_") and v.output.startswith("S")]
    assert sharded, "expected sharded parameters on a slow network"
    assert plan.predicted_step_s < plan.baselines["dp_even"].predicted_step_s / 1.5
    assert loss_err < TOL and param_err < TOL, (loss_err, param_err)


def test_wrong_world_size_names_expected_ranks(tmp_path):
    plan = plan_for(str(ROOT / "examples/mlp.py"), str(CLUSTERS / "cpu-1-2-4.toml"))
    emit_program(plan, tmp_path / "out", spec=str(ROOT / "examples/mlp.py"))
    p = torchrun(2, tmp_path / "out" / "train.py", ["--steps", "1"])
    assert p.returncode != 0
    assert "needs 3 ranks" in p.stdout + p.stderr
    assert 'train.py", line' not in p.stdout + p.stderr, "train.py must stop with a message, not a traceback"


def test_single_process_plan_runs_without_torchrun(tmp_path):
    cluster = tmp_path / "one.toml"
    cluster.write_text('[[nodes]]\ndevice = "cpu"\ncount = 1\n')
    plan = plan_for(str(ROOT / "examples/cnn.py"), str(cluster))
    emit_program(plan, tmp_path / "out", spec=str(ROOT / "examples/cnn.py"))
    p = subprocess.run([sys.executable, str(tmp_path / "out" / "train.py"), "--steps", "2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "step    1" in p.stdout


def test_row_sharded_embedding_bags_are_exact(tmp_path):
    """DLRM with its tables sharded by rows (each rank sums the bags' rows it owns: P), 1:3 shares."""
    pins = {"p_tables_0_weight": "S(0)", "p_tables_1_weight": "S(0)"}
    plan, loss_err, param_err = run_exact(str(ROOT / "examples/dlrm.py"), str(CLUSTERS / "default.toml"),
                                          tmp_path, pins=pins)
    assert plan.nodes["embedding_bag"].candidate.name == "rows:P"
    assert any("sharded by rows" in n for n in plan.notes)
    assert loss_err < TOL and param_err < TOL, (loss_err, param_err)


def test_a_different_model_than_planned_is_refused(tmp_path, monkeypatch):
    """The spec reads its sizes from the environment: running with other sizes must stop."""
    monkeypatch.setenv("HAP_MLP_WIDTH", "128")
    plan = plan_for(str(ROOT / "examples/mlp.py"), str(CLUSTERS / "default.toml"))
    emit_program(plan, tmp_path / "out", spec=str(ROOT / "examples/mlp.py"))
    monkeypatch.setenv("HAP_MLP_WIDTH", "256")
    p = torchrun(2, tmp_path / "out" / "train.py", ["--steps", "1"])
    assert p.returncode != 0
    assert "different model than the one planned" in p.stdout + p.stderr
    assert 'train.py", line' not in p.stdout + p.stderr

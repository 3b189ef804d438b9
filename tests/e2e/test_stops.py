"""Runs that must stop, stopping well: every rank says why and no rank hangs; a --save directory
that holds another run's work, or that not every node sees, is refused before anything is lost;
a run stopped on a non-finite value is not restarted into it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from hap.emit import emit_program
from tests.e2e.harness import ROOT, plan_for, torchrun
from tests.e2e.test_two_nodes import CLUSTER as TWO_NODES
from tests.e2e.test_two_nodes import PIN, launch_nodes

FAULTS = str(ROOT / "tests" / "models" / "faults.py")
MLP = str(ROOT / "examples" / "mlp.py")
DEFAULT = str(ROOT / "profiles" / "clusters" / "default.toml")


def worker_traceback(text: str) -> bool:
    """Whether a rank died with a traceback through hap or train.py (torchrun's agent prints its
    own ChildFailedError traceback whenever a rank exits non-zero: that one says nothing)."""
    return re.search(r'File "[^"]*(/hap/|train\.py)', text) is not None


def emitted(tmp: Path, spec: str, cluster: str = DEFAULT, name: str = "out", pins=None) -> Path:
    return emit_program(plan_for(spec, cluster, pins), tmp / name, spec=spec)


def steps_saved(d: Path) -> list[str]:
    return sorted(x.name for x in d.glob("step_*"))


@pytest.fixture
def fault(monkeypatch):
    def set_fault(kind: str) -> None:
        monkeypatch.setenv("HAP_TEST_FAULT", kind)
    return set_fault


def test_a_fresh_run_into_another_runs_save_directory_is_refused_and_deletes_nothing(tmp_path):
    """The issue's reproduction, small: a run saved up to step 6; a fresh run of 4 steps with the
    same --save used to write step_000002 and rotate it away at once (6 and 3 rank higher)."""
    train, ck = emitted(tmp_path, MLP), tmp_path / "ck"
    first = torchrun(2, train, ["--steps", "6", "--save", str(ck), "--save-every", "3"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert steps_saved(ck) == ["step_000003", "step_000006"]
    fresh = torchrun(2, train, ["--steps", "4", "--save", str(ck), "--save-every", "2"], timeout=90)
    assert fresh.returncode != 0 and "already holds checkpoints of another run" in fresh.stderr, fresh.stderr[-2000:]
    assert f"--resume {ck} --save {ck}" in fresh.stderr and not worker_traceback(fresh.stderr)
    assert steps_saved(ck) == ["step_000003", "step_000006"] and (ck / "latest").read_text() == "step_000006\n"
    # continuing it under another optimizer: refused, or the weights with a fresh optimizer state
    adam = ["--steps", "8", "--resume", str(ck), "--save", str(ck), "--save-every", "1", "--optimizer", "adam"]
    other = torchrun(2, train, adam, timeout=90)
    assert other.returncode != 0 and "--optimizer sgd" in other.stderr and "--reset-optimizer" in other.stderr
    reset = torchrun(2, train, adam + ["--reset-optimizer"])
    assert reset.returncode == 0, reset.stderr[-2000:]
    assert "at step 6 (adam's state starts afresh)" in reset.stdout
    # the resumed run rotates its own checkpoints only: the first run's stay
    assert steps_saved(ck) == ["step_000003", "step_000006", "step_000007", "step_000008"]
    assert not (ck / ".hap.lock").exists()


def test_a_model_that_differs_on_one_rank_stops_every_rank_with_the_message(tmp_path, fault):
    train = emitted(tmp_path, FAULTS)
    fault("model")
    p = torchrun(2, train, ["--steps", "2"], timeout=120)
    assert p.returncode != 0
    assert "the spec built a different model than the one planned" in p.stderr, p.stderr[-2000:]
    assert "stopping: rank(s) 1 failed a start-up check" in p.stderr  # rank 0 says why it stops too
    assert not worker_traceback(p.stderr)


def test_a_batch_of_the_wrong_shape_stops_with_the_step_and_shapes(tmp_path, fault):
    train = emitted(tmp_path, FAULTS)
    fault("batch")
    p = torchrun(2, train, ["--steps", "4"], timeout=120)
    assert p.returncode != 0, p.stderr[-2000:]
    assert "batch(2, 16) returned tensor 0 of shape [15, 8] float32, the plan was made for [16, 8]" in p.stderr
    assert p.stderr.count("returned tensor 0") == 2 and not worker_traceback(p.stderr)  # every rank says it


def test_non_finite_gradients_under_a_finite_loss_stop_before_they_are_applied(tmp_path, fault):
    fault("grad")
    train = emitted(tmp_path, FAULTS)
    p = torchrun(2, train, ["--steps", "3"], timeout=120)
    assert p.returncode != 0, p.stderr[-2000:]
    assert "the gradient norm is nan at step 0" in p.stderr and "loss" not in p.stderr.split("at step 0")[0][-40:]


def test_a_run_stopped_on_nan_is_not_restarted_into_it(tmp_path):
    train, ck = emitted(tmp_path, MLP), tmp_path / "ck"
    p = torchrun(2, train, ["--steps", "8", "--lr", "1e30", "--save", str(ck), "--save-every", "1"],
                 extra=("--max-restarts=1",))
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert out.count("Last good checkpoint") == 2, out[-3000:]  # the first attempt's ranks, once each
    assert "an earlier attempt of this run stopped at step" in p.stderr and "stopping for good" in p.stderr
    assert out.count("resuming from") == 0  # the restart trained nothing


def test_a_gpu_plan_on_a_machine_without_cuda_says_what_it_needs(tmp_path):
    cluster = tmp_path / "t4.toml"
    cluster.write_text('name = "2xT4"\n[[nodes]]\ndevice = "T4-16GB"\ncount = 2\n')
    train = emitted(tmp_path, MLP, str(cluster))
    p = torchrun(2, train, ["--steps", "1"], timeout=90)
    assert p.returncode != 0, p.stderr[-2000:]
    assert "this plan runs on GPUs (T4-16GB, NCCL), but this machine has" in p.stderr
    assert "_cuda_setDevice" not in p.stderr and not worker_traceback(p.stderr)


def test_save_storage_that_another_node_does_not_see_is_refused_on_every_rank(tmp_path):
    train = emitted(tmp_path, MLP, TWO_NODES, pins=PIN)
    results = launch_nodes(train, [(0, 1), (1, 2)], ["--steps", "2"], cwd=tmp_path, timeout=120, wait_all=True,
                           node_args=[["--save", str(tmp_path / "node0")], ["--save", str(tmp_path / "node1")]])
    text = "".join(r.stdout + r.stderr for r in results)
    assert all(r.returncode != 0 for r in results), text[-3000:]
    for rank in (1, 2):
        assert f"rank {rank} (node 1) does not see rank 0's" in text, text[-3000:]
    assert "storage every node shares" in text and "stopping: rank(s) 1, 2 failed" in text
    assert not (tmp_path / "node0" / ".hap.lock").exists()  # released: the next run may start


def test_nodes_running_different_plans_are_refused_naming_the_node(tmp_path):
    ours = emitted(tmp_path, MLP, TWO_NODES, name="ours", pins=PIN)
    theirs = emitted(tmp_path, MLP, TWO_NODES, name="theirs")  # another plan for the same 3 ranks
    results = launch_nodes([ours, theirs], [(0, 1), (1, 2)], ["--steps", "2"], cwd=tmp_path, timeout=120,
                           wait_all=True)
    text = "".join(r.stdout + r.stderr for r in results)
    assert all(r.returncode != 0 for r in results), text[-3000:]
    assert text.count("the ranks run different programs") == 3, text[-3000:]
    assert "rank 1 on node 1 runs plan" in text and "rank 2 on node 1 runs plan" in text
    assert "another train.py" in text and not worker_traceback(text)

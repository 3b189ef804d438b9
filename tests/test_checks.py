"""Start-up checks for the first GPU run, tested without a GPU: the backend follows the plan
(a CPU plan stays on gloo and the CPU on a machine with GPUs), GPU names match on word
boundaries with at least the planned memory, MIG slices are refused, and a rank that fails
its check stops every rank with its message instead of a hang."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

import hap.runtime as hr
from hap.runtime.checks import backend_for, device_mismatch
from tests.e2e.harness import torchrun


def test_the_backend_follows_the_planned_devices():
    assert backend_for(["cpu", "cpu"]) == "gloo"
    assert backend_for(["V100-16GB", "P100-16GB"]) == "nccl"
    with pytest.raises(ValueError, match="mixes CPU and GPU ranks"):
        backend_for(["cpu", "V100-16GB"])


def test_a_cpu_plan_stays_on_the_cpu_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    hr.init(backend_for(["cpu"]))
    assert hr.device() == torch.device("cpu")


@pytest.mark.parametrize("expected,name,gb,ok", [
    ("A10-24GB", "NVIDIA A10", 23.7, True),
    ("A10-24GB", "NVIDIA A100-SXM4-80GB", 85.1, False),  # "A10" is not an A100
    ("A10-24GB", "NVIDIA A10G", 23.7, False),
    ("L4-24GB", "NVIDIA L4", 24.1, True),                 # reports 22.5 GiB: less than its label in GiB
    ("L4-24GB", "NVIDIA L40S", 47.7, False),
    ("V100-16GB", "Tesla V100-SXM2-32GB", 34.1, True),     # more memory than planned is fine
    ("V100-32GB", "Tesla V100-SXM2-16GB", 16.9, False),    # less is not
    ("A100-40GB", "NVIDIA A100-SXM4-40GB MIG 3g.20gb", 20.0, False),
])
def test_gpu_names_match_on_word_boundaries_with_the_planned_memory(monkeypatch, expected, name, gb, ok):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda _d: SimpleNamespace(name=name, total_memory=int(gb * 1e9)))
    wrong = device_mismatch(expected, torch.device("cuda", 0))
    assert (wrong is None) is ok, wrong
    if not ok:
        assert name in wrong or "MIG" in wrong


AGREE = r"""
import types
import torch
import hap.runtime as hr
from hap.runtime.program import Program, agree_or_stop
rank, _ = hr.init("gloo")
layout = types.SimpleNamespace(world_size=2, rank=rank, plan_digest="0123456789ab", places=[(0, 0, 2), (0, 1, 2)],
                               device=torch.device("cpu"))
wrong = "rank 1: the plan expects a V100-16GB, this rank has a Tesla T4" if rank == 1 else None
agree_or_stop(Program(layout, None, __file__), wrong)
hr.leave(0)
"""


def test_a_rank_that_fails_its_check_stops_every_rank_with_its_message(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    t0 = time.monotonic()
    p = torchrun(2, script, [], timeout=120)
    assert time.monotonic() - t0 < 60
    assert p.returncode != 0
    assert "rank 1: the plan expects a V100-16GB, this rank has a Tesla T4" in p.stderr
    assert "stopping: rank(s) 1 failed a start-up check" in p.stderr


def test_a_plan_that_mixes_cpu_and_gpu_ranks_is_not_emitted(tmp_path):
    from hap.api import plan_graph
    from hap.cluster import cluster_from_dict
    from hap.emit import emit_program
    from hap.errors import HapError
    from tests.helpers import ROOT, captured, load_example

    nodes = [{"device": "cpu", "count": 1}, {"device": "V100-16GB", "count": 1}]
    cluster = cluster_from_dict({"name": "mixed", "network": {"inter_node_gbps": 10}, "nodes": nodes},
                                base_dir=ROOT / "profiles" / "clusters")
    plan = plan_graph(captured(load_example("mlp"))[2], cluster)
    with pytest.raises(HapError, match="mixes CPU and GPU ranks"):
        emit_program(plan, tmp_path / "out", spec=str(ROOT / "examples/mlp.py"))
    assert not (tmp_path / "out" / "train.py").exists()


def test_each_rank_of_a_mixed_node_finds_its_planned_kind_of_gpu(monkeypatch):
    from hap.runtime.checks import planned_gpu

    # one node whose CUDA order (fastest first) is A100, A100, V100, V100, while the cluster file
    # lists the V100s first: ranks 0-1 are planned on V100s, ranks 2-3 on A100s; a second node of T4s
    names = ["NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-16GB", "Tesla V100-SXM2-16GB"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(name=names[d.index], total_memory=(80 if "A100" in names[d.index]
                                                                                     else 16) * 2**30))
    expected = ["V100-16GB", "V100-16GB", "A100-80GB", "A100-80GB"]
    places = [(0, 0, 4), (0, 1, 4), (0, 2, 4), (0, 3, 4)]
    assert [planned_gpu(expected, places, r) for r in range(4)] == [2, 3, 0, 1]
    # a node of one model: each rank takes its local rank's GPU, as torchrun's LOCAL_RANK would
    names[:] = ["Tesla V100-SXM2-16GB"] * 4
    assert [planned_gpu(["V100-16GB"] * 4, places, r) for r in range(4)] == [0, 1, 2, 3]
    # too few GPUs of the planned model: no index (the device check then names both devices)
    assert planned_gpu(expected, places, 2) is None
    assert planned_gpu(["cpu"] * 4, places, 0) is None

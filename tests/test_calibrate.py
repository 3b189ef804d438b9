"""device = "cpu" on a fresh machine: calibration on first use, its cache, per-collective fits,
and plan-time timing of matmul-class ops at the ranks' exact shapes."""
from __future__ import annotations

import json

import pytest

import hap.calibrate
from hap import optimer
from hap.api import plan_graph
from hap.cluster import ClusterFileError, DeviceProfile, Link, cluster_from_dict, load_cluster, load_device
from hap.cost import CostModel, collective_s
from hap.placement import R, S, Splitter
from hap.rules import Candidate
from tests.helpers import ROOT, captured, load_example

S0 = S(0)
SHIPPED = json.loads((ROOT / "profiles" / "devices" / "cpu.json").read_text())


def test_first_use_calibrates_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HAP_CPU_PROFILE", "auto")
    monkeypatch.setenv("HAP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hap.calibrate, "calibrate", lambda out: pytest.fail("parsing a cluster file measured"))
    cluster = load_cluster(None)  # the default cluster names device = "cpu": nothing measured yet
    assert cluster.this_machine == ("cpu",) and cluster.profile(0) == load_device("cpu")
    monkeypatch.undo()
    monkeypatch.setenv("HAP_CPU_PROFILE", "auto")
    monkeypatch.setenv("HAP_CACHE_DIR", str(tmp_path))
    said = []
    cluster = hap.calibrate.resolve(cluster, said.append)  # where the cost is first needed (~20 s)
    assert said and "measuring" in said[0] and not cluster.this_machine
    prof = cluster.profile(0)
    cache = hap.calibrate.cache_path()
    assert cache.is_file() and cache.parent == tmp_path
    assert prof.measure_ops and "calibration" in prof.provenance
    assert prof.flop_per_s["matmul"]["fp32"] > 0 and prof.memory_bytes_per_s > 0
    assert prof.provenance["flop_per_s.matmul.fp32"].startswith("measured:")
    assert prof.intra_node.collectives and "all_reduce" in prof.intra_node.collectives  # 2 processes measured
    # the second plan reads the cache and does not measure again
    monkeypatch.setattr(hap.calibrate, "calibrate", lambda out: pytest.fail("calibrated twice"))
    assert hap.calibrate.resolve(load_cluster(None)).profile(0) == prof
    assert hap.calibrate.resolve(cluster) is cluster  # a resolved cluster has nothing left to resolve


def test_profile_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("HAP_CPU_PROFILE", "shipped")
    assert not hap.calibrate.resolve(load_cluster(None)).profile(0).measure_ops
    own = dict(SHIPPED, memory_bytes=2**30)
    (tmp_path / "mine.json").write_text(json.dumps(own))
    monkeypatch.setenv("HAP_CPU_PROFILE", str(tmp_path / "mine.json"))
    assert hap.calibrate.resolve(load_cluster(None)).profile(0).memory_bytes == 2**30
    monkeypatch.setenv("HAP_CPU_PROFILE", str(tmp_path / "missing.json"))
    with pytest.raises(ClusterFileError, match="HAP_CPU_PROFILE"):
        hap.calibrate.resolve(load_cluster(None))


def test_parsing_reads_neither_the_environment_nor_the_cache(tmp_path, monkeypatch):
    """A cluster file means the same on every machine: device "cpu" parses to the shipped profile,
    whatever HAP_CPU_PROFILE says and whatever the cache holds; only resolve reads them."""
    monkeypatch.setenv("HAP_CPU_PROFILE", str(tmp_path / "missing.json"))
    assert load_cluster(None).profile(0) == load_device("cpu")
    monkeypatch.setenv("HAP_CPU_PROFILE", "auto")
    monkeypatch.setenv("HAP_CACHE_DIR", str(tmp_path))
    cached = dict(SHIPPED, memory_bytes=2**30, measure_ops=True)
    hap.calibrate.cache_path().write_text(json.dumps(cached))
    monkeypatch.setattr(hap.calibrate, "calibrate", lambda out: pytest.fail("a cached machine measured"))
    cluster = load_cluster(None)
    assert cluster.profile(0) == load_device("cpu") and cluster.this_machine == ("cpu",)
    resolved = hap.calibrate.resolve(cluster)
    assert resolved.profile(0).memory_bytes == 2**30 and resolved.profile(0).measure_ops
    assert cluster.profile(0) == load_device("cpu")  # resolve returns a new cluster
    # a profile file that happens to be named "cpu" is that file's numbers, not this machine
    from_file = _measuring_cluster(tmp_path)
    assert not from_file.this_machine and hap.calibrate.resolve(from_file) is from_file


def test_per_collective_fits_round_trip_and_drive_the_cost():
    d = json.loads(json.dumps(SHIPPED))
    d["intra_node"]["collectives"] = {"all_reduce": {"alpha_s": 1e-3, "bytes_per_s": 1e9},
                                      "all_gather.padded": {"alpha_s": 2e-3, "bytes_per_s": 5e8}}
    prof = DeviceProfile.from_json(d)
    assert DeviceProfile.from_json(prof.to_json()) == prof
    link = prof.intra_node
    assert link.for_collective("all_reduce") == (1e-3, 1e9)
    assert link.for_collective("all_gather.padded") == (2e-3, 5e8)
    assert link.for_collective("all_to_all.grouped") == (link.alpha_s, link.bytes_per_s)  # not fitted: the link
    even = (0.5, 0.5)
    assert collective_s("all_reduce", 1e6, even, link, "") == pytest.approx(2 * 1e-3 + 1e6 / 1e9)
    plain = Link(link.alpha_s, link.bytes_per_s)
    assert collective_s("all_gather", 1e6, even, link, "padded") == pytest.approx(2e-3 + 0.5e6 / 5e8)
    assert collective_s("all_to_all", 1e6, even, link, "grouped") == collective_s("all_to_all", 1e6, even,
                                                                                  plain, "grouped")
    d["intra_node"]["collectives"]["all_reduce"] = {"alpha_s": 1e-3}
    with pytest.raises(ClusterFileError, match="collectives.all_reduce.bytes_per_s"):
        DeviceProfile.from_json(d)


def _measuring_cluster(tmp_path):
    path = tmp_path / "cpu-measured.json"
    path.write_text(json.dumps(dict(SHIPPED, measure_ops=True)))
    return cluster_from_dict({"nodes": [{"device": str(path), "count": 1, "slowdown": 1.0, "node": "a"},
                                        {"device": str(path), "count": 1, "slowdown": 3.0, "node": "a"}]})


def test_timed_ops_follow_shapes_and_slowdown(tmp_path):
    optimer.clear()
    graph = captured(load_example("mlp"), batch_size=256)[2]
    cluster = _measuring_cluster(tmp_path)
    cm = CostModel(graph, cluster, Splitter((192, 64)))
    lin = next(n for n in graph if n.op_class == "matmul" and n.name == "linear_1")
    batch_split = Candidate("b", tuple(S0 if i == 0 else R for i in range(3)), S0, split=(256, 1))
    fast, slow = cm.compute_s(lin, batch_split)
    whole_fast, whole_slow = cm.whole_s(lin, 0), cm.whole_s(lin, 1)
    assert whole_slow == pytest.approx(3 * whole_fast)  # the same timing, dilated as the emulation does
    assert 0 < fast <= whole_fast * 1.0001
    assert slow >= 3 * 0.25 * whole_fast * 0.9999  # never below its share of the whole op
    # small ops are timed too (their overhead is most of their time); views are not
    relu = next(n for n in graph if n.target == "aten.relu.default")
    view = next(n for n in graph if n.kind == "op" and n.op_class == "view")  # broadcast_tensors
    assert cm._measures(relu, None, 0) and cm.whole_s(relu, 0) != cm._affine_s(relu, 0)[0]
    assert not cm._measures(view, None, 0)
    for r, t in enumerate((fast, slow)):
        a, b = cm.affine_s(lin, batch_split, r)  # the secant the share refit uses
        f = (0.75, 0.25)[r]
        assert a >= 0 and b >= 0
        assert a * f + b == pytest.approx(t, rel=1e-6) and a + b == pytest.approx(cm.whole_s(lin, r), rel=1e-6)


def test_an_op_repeated_in_each_block_is_timed_once(tmp_path, monkeypatch):
    """The hidden layers' linears and relus run the same calls on the same shapes, reading inputs
    of other names: one timing each serves them all (an 8-block GPT's plan timed every block's
    ops again, 2m54s of planning against 52 s)."""
    optimer.clear()
    timed = []
    median = optimer._median_s
    monkeypatch.setattr(optimer, "_median_s", lambda step, repeats: timed.append(1) or median(step, repeats))
    graph = captured(load_example("mlp"), batch_size=256)[2]
    cm = CostModel(graph, _measuring_cluster(tmp_path), Splitter((192, 64)))
    for names in (("linear_1", "linear_2"), ("relu_1", "relu_2")):
        before = len(timed)
        first, second = (cm.whole_s(graph[n], 0) for n in names)
        assert len(timed) == before + 1 and first == second > 0, names
    # another shape is another call: the first layer reads the inputs, not a hidden layer's width
    before = len(timed)
    cm.whole_s(graph["linear"], 0)
    assert len(timed) == before + 1


def test_plan_with_timed_ops_keeps_its_invariants(tmp_path):
    optimer.clear()
    graph = captured(load_example("mlp"), batch_size=256)[2]
    plan = plan_graph(graph, _measuring_cluster(tmp_path))
    assert sum(plan.shares) == 256 and plan.shares[0] > plan.shares[1]
    # the share refit on timed ops stays within 10% of speed-proportional (192 : 64), +1 rounding
    assert abs(plan.shares[1] - 64) <= 0.10 * 64 + 1
    assert plan.lower_bound_step_s <= plan.predicted_step_s
    for name, b in plan.baselines.items():
        if b.feasible:
            assert plan.predicted_step_s <= b.predicted_step_s * (1 + 1e-9), name



def test_collective_local_work_is_timed_and_dilated(tmp_path):
    """With measured ops, a resharding move costs its α-β wire time plus its timed local work on the
    slowest rank (dilated by the slowdown, less what the α-β already hold); without, a formula."""
    optimer.clear()
    from hap.cost import PricedMove, _local_extra_s, _wire_price
    from hap.graph import TensorMeta
    from hap.placement import P

    graph = captured(load_example("mlp"), batch_size=256)[2]
    meta = TensorMeta((512, 512), "float32")
    measuring = CostModel(graph, _measuring_cluster(tmp_path), Splitter((192, 64)))
    wire = _wire_price(measuring, meta, S(1), R, True)
    local = measuring.measured_move_s(meta, S(1), R, wire.form, True)
    assert local is not None and all(t > 0 for t in local)
    assert measuring.measured_move_s(meta, R, S(0), "", True) is None  # a slice sends nothing
    moved = measuring.price_move(meta, S(1), R, True)
    fs = measuring._fr(meta, S(1))
    extra = _local_extra_s(measuring, meta, S(1), R, PricedMove(wire.kind, wire.form, 0.0), fs, None, True)
    assert moved.seconds == pytest.approx(wire.seconds + extra)
    assert extra == pytest.approx(max(0.0, max(3 * local[1], local[0]) - _formula_min(measuring, meta, fs)))
    shipped = CostModel(graph, cluster_from_dict({"nodes": [{"device": "cpu", "count": 2}]}), Splitter((128, 128)))
    assert shipped.measured_move_s(meta, S(1), R, "grouped", True) is None
    assert shipped.measured_move_s(meta, P, R, "", True) is None


def _formula_min(cm, meta, fs):
    from hap.cost import _local_work_s

    return min(_local_work_s(cm, "all_gather", meta.nbytes, fs, None, r) * 2 for r in range(cm.n))

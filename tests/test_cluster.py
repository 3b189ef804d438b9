"""Cluster files, device profiles and the Cluster artifact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hap.cluster import (
    Cluster,
    DeviceProfile,
    Link,
    cluster_from_dict,
    known_devices,
    load_cluster,
    load_device,
    profiles_dir,
)
from hap.errors import ClusterFileError

CLUSTERS = sorted((profiles_dir() / "clusters").glob("*.toml"))
DEVICES = sorted((profiles_dir() / "devices").glob("*.json"))
SHIPPED_DEVICES = {
    "cpu", "V100-16GB", "V100-32GB", "P100-16GB", "A100-40GB", "A100-80GB",
    "H100-80GB", "T4-16GB", "L4-24GB", "A10-24GB",
}  # fmt: skip
SHIPPED_CLUSTERS = {
    "default", "cpu-1-2-4", "cpu-homogeneous", "cpu-slow-net", "hap-paper",
    "v100x8", "a100-l4", "v100-a100-mem",
}  # fmt: skip
SOURCE_PREFIXES = ("datasheet:", "scaled:", "measured:", "estimate:", "budget:")


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def cpu_entry(**kw) -> dict:
    return {"device": "cpu", "count": 1, **kw}


# --- shipped files ---------------------------------------------------------------------------------


def test_shipped_files_present():
    assert SHIPPED_DEVICES <= set(known_devices())
    assert SHIPPED_CLUSTERS <= {p.stem for p in CLUSTERS}


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_every_shipped_cluster_loads_and_lints(path):
    cluster = load_cluster(path)
    cluster.lint()
    assert cluster.num_ranks >= 2
    assert all(cluster.speed(r) > 0 and cluster.memory_bytes(r) > 0 for r in range(cluster.num_ranks))


def _numeric_leaves(d, prefix=""):
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _numeric_leaves(value, path + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path


@pytest.mark.parametrize("path", DEVICES, ids=lambda p: p.stem)
def test_every_device_profile_has_provenance_for_every_number(path):
    data = json.loads(path.read_text())
    profile = load_device(path.stem)
    assert profile.name == path.stem
    leaves = [k for k in _numeric_leaves({k: v for k, v in data.items() if k != "provenance"})]
    assert "memory_bytes" in leaves and "flop_per_s.matmul.fp32" in leaves
    for leaf in leaves:
        assert leaf in data["provenance"], f"{path.name}: no provenance for {leaf}"
        assert data["provenance"][leaf].startswith(SOURCE_PREFIXES), data["provenance"][leaf]
    assert {"matmul", "conv", "attention"} <= set(data["flop_per_s"])
    if path.stem != "cpu":  # GPUs list every training dtype; the measured cpu lists what it ran
        assert {"fp32", "fp16", "bf16"} <= set(data["flop_per_s"]["matmul"])
    assert DeviceProfile.from_json(profile.to_json()) == profile


def test_achieved_rates_relate_sensibly():
    v100, p100, a100, h100 = (load_device(n) for n in ("V100-16GB", "P100-16GB", "A100-80GB", "H100-80GB"))
    assert p100.compute_rate("matmul", "fp32") < v100.compute_rate("matmul", "fp32")
    assert v100.compute_rate("matmul", "fp32") < a100.compute_rate("matmul", "fp32")
    assert a100.compute_rate("matmul", "bf16") < h100.compute_rate("matmul", "bf16")
    # No native bf16 on V100: emulated at the fp32 rate, never faster.
    assert v100.compute_rate("matmul", "bf16") == v100.compute_rate("matmul", "fp32")
    assert v100.compute_rate("matmul", "fp16") > 4 * v100.compute_rate("matmul", "fp32")
    # Unknown class -> matmul; unknown dtype -> fp32; torch-style dtype names accepted.
    assert v100.compute_rate("layer_norm_ish", "fp32") == v100.compute_rate("matmul", "fp32")
    assert v100.compute_rate("conv", "int8") == v100.compute_rate("conv", "fp32")
    assert a100.compute_rate("matmul", "torch.bfloat16") == a100.compute_rate("matmul", "bf16")
    assert load_device("v100-16gb") == v100  # case-insensitive names


# --- rank numbering, nodes, links ------------------------------------------------------------------


def test_rank_numbering_entries_then_repeats_then_devices():
    cluster = cluster_from_dict(
        {
            "network": {"inter_node_gbps": 10},
            "nodes": [
                {"device": "V100-16GB", "count": 2, "repeat": 2},
                {"device": "P100-16GB", "count": 3},
            ],
        }
    )
    assert [r.device for r in cluster.ranks] == ["V100-16GB"] * 4 + ["P100-16GB"] * 3
    assert [r.node for r in cluster.ranks] == [0, 0, 1, 1, 2, 2, 2]
    assert [r.rank for r in cluster.ranks] == list(range(7))
    assert cluster.nodes() == [[0, 1], [2, 3], [4, 5, 6]]


def test_hap_paper_nodes_and_links():
    cluster = load_cluster("hap-paper")
    assert cluster.num_ranks == 64 and cluster.num_nodes == 8
    assert [r.node for r in cluster.ranks] == [n for n in range(8) for _ in range(8)]
    assert {cluster.ranks[r].device for r in range(16)} == {"V100-16GB"}
    assert {cluster.ranks[r].device for r in range(16, 64)} == {"P100-16GB"}
    v100_link = cluster.group_link(range(8))
    assert v100_link == load_device("V100-16GB").intra_node
    assert cluster.group_link(range(16, 24)) == load_device("P100-16GB").intra_node
    whole = cluster.group_link()
    assert whole.bytes_per_s == pytest.approx(1.3e9)
    assert whole.alpha_s >= v100_link.alpha_s and whole.alpha_s == pytest.approx(30e-6)
    assert cluster.group_link([7, 8]).bytes_per_s == pytest.approx(1.3e9)  # across two machines
    # A group inside one machine is never slower than one across machines.
    assert v100_link.time_s(1e8) < whole.time_s(1e8)


def test_default_is_one_node_with_uneven_cpu_ranks():
    cluster = load_cluster()
    assert cluster.num_ranks == 2 and cluster.num_nodes == 1
    assert [r.slowdown for r in cluster.ranks] == [1.0, 3.0]
    assert cluster.group_link() == load_device("cpu").intra_node
    assert cluster.speed(0) == pytest.approx(3 * cluster.speed(1))


def test_slow_net_is_two_nodes_bound_by_the_network():
    cluster = load_cluster("cpu-slow-net")
    assert cluster.num_nodes == 2
    assert cluster.group_link().bytes_per_s == pytest.approx(0.1e9 / 8)


def test_inter_node_alpha_from_file(tmp_path):
    path = write(
        tmp_path,
        '[network]\ninter_node_gbps = 25\ninter_node_alpha_us = 50\n[[nodes]]\ndevice = "A100-80GB"\n'
        "count = 2\nrepeat = 2\n",
    )
    cluster = load_cluster(path)
    assert cluster.inter_node == Link(alpha_s=50e-6, bytes_per_s=25e9 / 8)
    assert cluster.name == "c"


def test_slowdown_divides_rates():
    cluster = load_cluster("cpu-1-2-4")
    cpu = load_device("cpu")
    for rank, slowdown in enumerate([1, 2, 4]):
        assert cluster.flop_rate(rank, "conv", "fp32") == pytest.approx(
            cpu.compute_rate("conv", "fp32") / slowdown
        )
        assert cluster.memory_rate(rank) == pytest.approx(cpu.memory_bytes_per_s / slowdown)
        assert cluster.kernel_floor(rank) == pytest.approx(cpu.kernel_floor_s * slowdown)
        assert cluster.memory_bytes(rank) == cpu.memory_bytes  # memory is not slowed down
    assert cluster.speed(0) / cluster.speed(2) == pytest.approx(4)


def test_named_nodes_share_a_machine():
    cluster = cluster_from_dict(
        {
            "network": {"inter_node_gbps": 1},
            "nodes": [cpu_entry(node="a"), cpu_entry(node="b"), cpu_entry(node="a", slowdown=2)],
        }
    )
    # numbered node by node: the second "a" entry is rank 1
    assert [(r.node, r.slowdown) for r in cluster.ranks] == [(0, 1.0), (0, 2.0), (1, 1.0)]
    assert cluster.group_link([0, 1]) == load_device("cpu").intra_node
    assert cluster.group_link([0, 2]).bytes_per_s == pytest.approx(1e9 / 8)


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_json_round_trip(path):
    cluster = load_cluster(path)
    again = Cluster.from_json(json.loads(json.dumps(cluster.to_json())))
    assert again == cluster


# --- errors ----------------------------------------------------------------------------------------

ERROR_CASES = {
    "no nodes": ('name = "x"\n', ["no [[nodes]]", "clusters"]),
    "syntax": ('[[nodes]\ndevice = "cpu"\n', ["TOML syntax error", "line 1"]),
    "unknown device": ('[[nodes]]\ndevice = "V100-16G"\ncount = 1\n', ["V100-16G", "V100-16GB", "devices"]),
    "count zero": ('[[nodes]]\ndevice = "cpu"\ncount = 0\n', ["nodes[0]", "count"]),
    "count float": (
        '[[nodes]]\ndevice = "cpu"\ncount = 1\n[[nodes]]\ndevice = "cpu"\ncount = 1.5\n',
        ["nodes[1]", "count"],
    ),
    "count missing": ('[[nodes]]\ndevice = "cpu"\n', ["nodes[0]", "count"]),
    "repeat negative": ('[[nodes]]\ndevice = "cpu"\ncount = 1\nrepeat = -2\n', ["nodes[0]", "repeat"]),
    "slowdown zero": ('[[nodes]]\ndevice = "cpu"\ncount = 1\nslowdown = 0\n', ["nodes[0]", "slowdown"]),
    "gbps zero": (
        '[network]\ninter_node_gbps = 0\n[[nodes]]\ndevice = "cpu"\ncount = 1\n',
        ["inter_node_gbps"],
    ),
    "network missing": ('[[nodes]]\ndevice = "cpu"\ncount = 1\nrepeat = 2\n', ["2 nodes", "inter_node_gbps"]),
    "unknown key": (
        '[[nodes]]\ndevice = "cpu"\ncount = 1\nslowdwn = 2\n',
        ["slowdwn", "allowed keys", "slowdown"],
    ),
    "unknown top key": ('nodez = 1\n[[nodes]]\ndevice = "cpu"\ncount = 1\n', ["nodez", "allowed keys"]),
    "unknown network key": (
        '[network]\ngbps = 1\n[[nodes]]\ndevice = "cpu"\ncount = 1\n',
        ["gbps", "inter_node_gbps"],
    ),
    "repeat with node": (
        '[[nodes]]\ndevice = "cpu"\ncount = 1\nrepeat = 2\nnode = "a"\n',
        ["nodes[0]", "count"],
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_cluster_file_errors(tmp_path, case):
    text, needles = ERROR_CASES[case]
    path = write(tmp_path, text)
    with pytest.raises(ClusterFileError) as info:
        load_cluster(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_missing_cluster_file(tmp_path):
    with pytest.raises(ClusterFileError, match="does not exist.*see .*clusters"):
        load_cluster(tmp_path / "nope.toml")


def test_unknown_device_by_name():
    with pytest.raises(ClusterFileError, match="A100-80GB"):
        load_device("A100-80")


PROFILE_BREAKAGES = {
    "missing memory": (lambda d: d.pop("memory_bytes"), "memory_bytes"),
    "negative rate": (lambda d: d["flop_per_s"]["matmul"].update(fp32=-1), "flop_per_s.matmul.fp32"),
    "no matmul fp32": (lambda d: d["flop_per_s"]["matmul"].pop("fp32"), "flop_per_s.matmul.fp32"),
    "link missing bw": (lambda d: d["intra_node"].pop("bytes_per_s"), "intra_node.bytes_per_s"),
    "string floor": (lambda d: d.update(kernel_floor_s="fast"), "kernel_floor_s"),
}


@pytest.mark.parametrize("case", PROFILE_BREAKAGES, ids=list(PROFILE_BREAKAGES))
def test_malformed_profile(tmp_path, case):
    breakage, needle = PROFILE_BREAKAGES[case]
    data = load_device("V100-16GB").to_json()
    breakage(data)
    profile = write(tmp_path, json.dumps(data), "mine.json")
    path = write(tmp_path, '[[nodes]]\ndevice = "mine.json"\ncount = 2\n')
    with pytest.raises(ClusterFileError) as info:
        load_cluster(path)
    assert str(profile) in str(info.value) and needle in str(info.value)


def test_profile_not_json(tmp_path):
    path = write(tmp_path, "{not json", "bad.json")
    with pytest.raises(ClusterFileError, match=r"bad.json.*line 1"):
        load_device(str(path))


def test_device_profile_by_relative_path(tmp_path):
    data = load_device("T4-16GB").to_json() | {"name": "my-T4"}
    write(tmp_path, json.dumps(data), "my-T4.json")
    cluster = load_cluster(write(tmp_path, '[[nodes]]\ndevice = "my-T4.json"\ncount = 2\n'))
    assert set(cluster.devices) == {"my-T4"} and cluster.num_ranks == 2


def test_hap_profiles_env(tmp_path, monkeypatch):
    (tmp_path / "devices").mkdir()
    (tmp_path / "clusters").mkdir()
    (tmp_path / "devices" / "cpu.json").write_text(json.dumps(load_device("cpu").to_json()))
    (tmp_path / "clusters" / "default.toml").write_text('[[nodes]]\ndevice = "cpu"\ncount = 4\n')
    monkeypatch.setenv("HAP_PROFILES", str(tmp_path))
    assert profiles_dir() == tmp_path and known_devices() == ["cpu"]
    assert load_cluster().num_ranks == 4


# --- properties ------------------------------------------------------------------------------------

valid_entry = st.fixed_dictionaries(
    {"device": st.sampled_from(["cpu", "V100-16GB", "P100-16GB", "L4-24GB"]), "count": st.integers(1, 8)},
    optional={
        "repeat": st.integers(1, 4),
        "slowdown": st.floats(0.01, 100) | st.integers(1, 10),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(valid_entry, min_size=1, max_size=5), gbps=st.floats(0.001, 1000))
def test_random_valid_clusters_load(entries, gbps):
    cluster = cluster_from_dict({"network": {"inter_node_gbps": gbps}, "nodes": entries})
    expected = sum(e["count"] * e.get("repeat", 1) for e in entries)
    assert cluster.num_ranks == expected
    assert cluster.num_nodes == sum(e.get("repeat", 1) for e in entries)
    for r in range(cluster.num_ranks):
        assert cluster.flop_rate(r, "matmul", "fp32") > 0
    assert Cluster.from_json(cluster.to_json()) == cluster


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
bad_field = st.sampled_from(["device", "count", "repeat", "slowdown", "node", "bogus"])


@settings(max_examples=150, deadline=None)
@given(
    entries=st.lists(valid_entry, min_size=1, max_size=3),
    index=st.integers(0, 2),
    field=bad_field,
    value=junk,
    network=st.one_of(st.none(), junk, st.fixed_dictionaries({"inter_node_gbps": junk})),
)
def test_random_invalid_clusters_raise_cluster_file_error(entries, index, field, value, network):
    data: dict = {"nodes": entries}
    entry = entries[index % len(entries)]
    entry[field] = value
    if network is not None:
        data["network"] = network
    try:
        cluster = cluster_from_dict(data)
    except ClusterFileError:
        return
    # It loaded: then what we wrote must have been valid after all.
    cluster.lint()
    assert cluster.num_ranks == sum(e["count"] * e.get("repeat", 1) for e in entries)


@settings(max_examples=100, deadline=None)
@given(data=st.dictionaries(st.sampled_from(["name", "nodes", "network", "extra"]), junk, max_size=4))
def test_junk_documents_raise_cluster_file_error(data):
    with pytest.raises(ClusterFileError):
        cluster_from_dict(data)


def test_capacity_is_what_a_card_reports_less_a_reserve():
    """An "L4-24GB" reports 23034 MiB, not 24 GiB, and the CUDA context and NCCL's buffers need
    room too: a plan may fill the reported memory less 1 GiB."""
    nodes = [{"device": "L4-24GB", "count": 1}, {"device": "T4-16GB", "count": 1}]
    cluster = cluster_from_dict({"network": {"inter_node_gbps": 10}, "nodes": nodes})
    assert cluster.memory_bytes(0) == 23034 * 2**20 - 2**30
    assert cluster.memory_bytes(1) == 15360 * 2**20 - 2**30
    assert load_cluster(None).memory_bytes(0) == load_device("cpu").memory_bytes  # no reserve on a CPU


def test_ranks_are_numbered_node_by_node_as_torchrun_starts_them(tmp_path):
    """Entries of one node need not be adjacent in the file; torchrun gives each node a
    contiguous block of ranks in --node-rank order, so the plan numbers them that way too."""
    from hap.emit import rank_places, torchrun_commands

    cluster = load_cluster(write(tmp_path, """
        [network]
        inter_node_gbps = 10
        [[nodes]]
        device = "V100-16GB"
        count = 2
        node = "a"
        [[nodes]]
        device = "T4-16GB"
        count = 1
        node = "b"
        [[nodes]]
        device = "P100-16GB"
        count = 1
        node = "a"
    """))
    assert [(r.rank, r.node, r.device) for r in cluster.ranks] == [
        (0, 0, "V100-16GB"), (1, 0, "V100-16GB"), (2, 0, "P100-16GB"), (3, 1, "T4-16GB")]
    assert cluster.nodes() == [[0, 1, 2], [3]]

    class Plan:  # what the emitter reads of a plan for its commands and placements
        pass

    plan = Plan()
    plan.cluster, plan.num_ranks = cluster, 4
    cmds = torchrun_commands(plan, "train.py")
    assert "--node-rank 0 --nproc-per-node 3" in cmds[0] and "ranks 0-2" in cmds[0]
    assert "--node-rank 1 --nproc-per-node 1" in cmds[1] and "ranks 3-3" in cmds[1]
    assert rank_places(plan) == ((0, 0, 3), (0, 1, 3), (0, 2, 3), (1, 0, 1))


def test_the_ranks_of_a_node_share_its_network_link_in_all_to_all_patterns():
    # 8 nodes of 8 GPUs: in an all-to-all each rank sends 56/63 of its bytes off its node, and the
    # 8 ranks of a node send them through its one link at once; a ring crosses it as one rank
    cluster = load_cluster(profiles_dir() / "clusters" / "hap-paper.toml")
    link = cluster.group_link()
    crowd = 8 * 56 / 63
    for key in ("all_to_all.grouped", "all_to_all.padded", "all_gather.grouped", "reduce_scatter.grouped"):
        assert link.for_collective(key)[1] == pytest.approx(link.bytes_per_s / crowd)
    for key in ("all_reduce", "all_gather.padded", "reduce_scatter.padded"):
        assert link.for_collective(key)[1] == link.bytes_per_s
    one_per_node = load_cluster(profiles_dir() / "clusters" / "cpu-2-nodes.toml").group_link()
    assert one_per_node.for_collective("all_to_all.grouped")[1] == one_per_node.bytes_per_s


def test_the_cluster_file_layer_does_not_reach_the_calibration():
    """Parsing is pure, so hap.cluster never imports hap.calibrate; hap.calibrate imports it to
    resolve device "cpu"."""
    import networkx as nx

    from tests.test_layers import import_graph

    g = import_graph()
    assert not nx.has_path(g, "hap.cluster", "hap.calibrate")


def test_device_cpu_is_named_as_this_machine():
    cluster = cluster_from_dict({"nodes": [{"device": "CPU", "count": 1, "node": "a"},
                                           {"device": "cpu", "count": 1, "slowdown": 2.0, "node": "a"},
                                           {"device": "V100-16GB", "count": 1, "node": "a"}]})
    assert cluster.this_machine == ("cpu",) and set(cluster.devices) == {"cpu", "V100-16GB"}
    assert cluster.profile(0) == load_device("cpu")
    assert not load_cluster("v100x8").this_machine
    assert Cluster.from_json(cluster.to_json()) == cluster
    assert "this_machine" not in load_cluster("v100x8").to_json()


MEASURED = '''name = "m"
[network]
inter_node_gbps = 10
[[nodes]]
device = "cpu"
count = 2
repeat = 2
'''


def test_measured_links_replace_the_typed_ones_and_price_the_collectives(tmp_path):
    from hap.profile.links import section, write_section

    path = tmp_path / "m.toml"
    path.write_text(MEASURED)
    typed = load_cluster(path)
    fitted = {"inter_node": {"alpha_us": 400.0, "gbps": 0.5, "all_reduce": [1000.0, 0.4], "all_to_all": [300.0, 0.45]},
              "intra_node.cpu": {"alpha_us": 50.0, "gbps": 20.0, "all_reduce": [80.0, 8.0], "all_to_all": [60.0, 9.0]}}
    write_section(path, section(fitted, typed, "gloo"))
    write_section(path, section(fitted, typed, "gloo"))  # again: replaced, not appended
    text = path.read_text()
    assert text.startswith(MEASURED) and text.count("[network.measured]") == 1 and text.count("# written by") == 1
    c = load_cluster(path)
    assert c.links.startswith("measured by hap-profile --links at ")
    assert c.inter_node.bytes_per_s == 0.5e9 / 8 and c.inter_node.alpha_s == 400e-6
    assert c.intra_link("cpu").bytes_per_s == 20e9 / 8
    whole = c.group_link([0, 1, 2, 3])
    assert whole.for_collective("all_reduce") == (1000e-6, 0.4e9 / 8)
    # all-to-all over nodes: the node's 2 ranks crowd its link (2 x 2 / 3), as with typed links
    a, b = whole.for_collective("all_to_all.grouped")
    assert a == 300e-6 and b == pytest.approx(0.45e9 / 8 / (4 / 3))
    assert c.group_link([0, 1]).for_collective("all_reduce") == (80e-6, 8e9 / 8)
    assert Cluster.from_json(c.to_json()) == c and Cluster.from_json(c.to_json()).links == c.links


@pytest.mark.parametrize("bad, says", [
    ('inter_node = { alpha_us = 1, gbps = 0 }', "gbps > 0"),
    ('inter_node = { alpha_us = 1, gbps = 1, speed = 3 }', "unknown key 'speed'"),
    ('nodes = 3\ninter_node = { alpha_us = 1, gbps = 1 }', "measured on 3 nodes"),
    ('[network.measured.intra_node]\n"V100-16GB" = { alpha_us = 1, gbps = 1 }', "which no [[nodes]] entry uses"),
])
def test_a_bad_measured_section_says_what_and_how_to_fix(tmp_path, bad, says):
    path = tmp_path / "m.toml"
    path.write_text(MEASURED + "[network.measured]\n" + bad + "\n")
    with pytest.raises(ClusterFileError, match=re.escape(says)):
        load_cluster(path)

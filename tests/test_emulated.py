"""hap-emulate (hap.emulated): an emulated cluster whose inter-node links are real and shaped.
Needs root and iproute2; elsewhere these tests are skipped, saying so."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from hap.emulated import emulated_network, main, namespaces, remove_leftovers

needs_netns = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
                                 reason="hap-emulate needs root (CAP_NET_ADMIN), ip and tc")

P2P = r'''
import json, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
r, x, out = dist.get_rank(), torch.ones(16 * 2**20), {}  # 64 MB
for name, (src, dst) in {"inter": (0, 2), "intra": (0, 1)}.items():
    dist.barrier()
    t0 = time.perf_counter()
    if r == src:
        dist.send(x, dst)
    elif r == dst:
        dist.recv(x, src)
    dist.barrier()
    out[name] = time.perf_counter() - t0
if r == 0:
    json.dump(out, open(sys.argv[1], "w"))
dist.destroy_process_group()
'''


@needs_netns
def test_64_mb_between_emulated_nodes_arrive_at_the_shaped_rate(tmp_path):
    cluster = tmp_path / "two.toml"
    cluster.write_text('name = "two"\n[network]\ninter_node_gbps = 0.5\n[[nodes]]\ndevice = "cpu"\ncount = 2\n'
                       'repeat = 2\n')
    (tmp_path / "p2p.py").write_text(P2P)
    before = set(namespaces())
    assert main([str(cluster), "--port", "29533", "--", str(tmp_path / "p2p.py"), str(tmp_path / "out.json")]) == 0
    took = json.loads((tmp_path / "out.json").read_text())
    rate = 64 * 2**20 * 8 / took["inter"] / 1e9
    assert abs(rate - 0.5) <= 0.15 * 0.5, took
    assert took["intra"] * 10 <= took["inter"], took
    assert set(namespaces()) == before, "the run's namespaces are removed"


@needs_netns
def test_a_dead_launchers_namespaces_are_removed_and_a_live_ones_kept():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    subprocess.run(["ip", "netns", "add", f"hap{dead.pid}n0"], check=True)
    # what a launcher killed with -9 leaves running in its namespace goes with the namespace
    orphan = subprocess.Popen(["ip", "netns", "exec", f"hap{dead.pid}n0", "sleep", "300"], start_new_session=True)
    with emulated_network(1, 1.0) as live:
        for _ in range(50):  # until the orphan is inside the namespace
            if subprocess.run(["ip", "netns", "pids", f"hap{dead.pid}n0"], capture_output=True, text=True).stdout:
                break
            time.sleep(0.1)
        gone = remove_leftovers()
        assert f"hap{dead.pid}n0" in gone and f"hap{dead.pid}n0" not in namespaces()
        assert orphan.wait(timeout=10) == -9
        assert set(live) <= set(namespaces())
    assert not set(live) & set(namespaces())


def test_without_root_or_ip_it_stops_with_exit_2_and_says_why(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert main([str(tmp_path / "c.toml"), "--", "x.py"]) == 2
    assert "needs ip and tc" in capsys.readouterr().err


@needs_netns
def test_hap_profile_links_measures_the_shaped_link_and_a_plan_uses_it(tmp_path):
    from hap.api import plan_spec
    from hap.cluster import load_cluster
    from hap.profile.launch import main as profile

    cluster = tmp_path / "two.toml"
    cluster.write_text('name = "two"\n[network]\ninter_node_gbps = 0.5\n[[nodes]]\ndevice = "cpu"\ncount = 1\n'
                       'repeat = 2\n')
    typed = load_cluster(cluster)
    for port in (29541, 29542):  # twice: a new measurement replaces the old one
        assert profile(["--links", str(cluster), "--emulated", "--quick", "--port", str(port)]) == 0
    assert cluster.read_text().count("[network.measured]") == 1
    measured = load_cluster(cluster)
    assert measured.links.startswith("measured by hap-profile --links")
    gbps = measured.inter_node.bytes_per_s * 8 / 1e9
    assert abs(gbps - 0.5) <= 0.15 * 0.5, gbps
    plan = plan_spec("examples/mlp.py", str(cluster))
    assert plan.cluster.inter_node == measured.inter_node != typed.inter_node
    fits = plan.cluster.group_link([0, 1]).collectives
    assert fits["all_reduce"] == measured.inter_node.collectives["all_reduce"], "the measured all-reduce prices it"
    assert plan.cluster.to_json()["links"] == measured.links


def test_a_launcher_killed_with_9_counts_as_gone_before_it_is_reaped():
    from hap.emulated import _alive

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert _alive(p.pid)
    p.kill()
    for _ in range(50):  # until the kernel has made it a zombie; its parent (this test) has not reaped it
        if not _alive(p.pid):
            break
        time.sleep(0.05)
    assert not _alive(p.pid), "a zombie is gone"
    p.wait()
    assert not _alive(p.pid) and _alive(os.getpid())


def test_the_emulated_links_are_the_files_declared_ones_not_a_measurement_of_them(tmp_path, monkeypatch):
    # a measurement of the 0.5 Gbit/s links (here 0.3) must not become the next run's shaped rate
    import contextlib

    import hap.emulated as emulated

    cluster = tmp_path / "two.toml"
    cluster.write_text('name = "two"\n[network]\ninter_node_gbps = 0.5\n[[nodes]]\ndevice = "cpu"\ncount = 1\n'
                       'repeat = 2\n[network.measured]\nnodes = 2\ninter_node = { alpha_us = 500, gbps = 0.3 }\n')
    shaped = []

    @contextlib.contextmanager
    def network(nodes, gbps, pid=None):
        shaped.append(gbps)
        yield [f"n{i}" for i in range(nodes)]

    class Node:
        def __init__(self, *a, **k):
            pass

        def wait(self):
            return 0

    monkeypatch.setattr(emulated, "check_tools", lambda: None)
    monkeypatch.setattr(emulated, "remove_leftovers", lambda: [])
    monkeypatch.setattr(emulated, "emulated_network", network)
    monkeypatch.setattr(emulated.subprocess, "Popen", Node)
    assert emulated.main([str(cluster), "--", "x.py"]) == 0
    assert shaped == [pytest.approx(0.5)]

"""``hap-emulate``: run a torchrun program on an emulated copy of a cluster file, with real links.

    hap-emulate CLUSTER.toml [--port P] -- PROGRAM [ARGS...]

Each node of the file becomes a Linux network namespace (``hap<pid>n<i>``) with its own torchrun
agent (``--nnodes N --node-rank i`` and the node's process count); its ranks talk over the
namespace's own loopback. The nodes are joined by a bridge in a namespace of its own
(``hap<pid>b``), each through a veth pair whose two ends are shaped with the ``tbf`` qdisc to the
file's ``inter_node_gbps``, so traffic in both directions meets the rate and a node's ranks share
their link, as the cost model assumes. Addresses are 198.18.0.i/24, the benchmarking range,
inside those namespaces only: nothing touches the host's network or leaves the machine.

Each rank's ``slowdown`` applies as under ``--emulate``: an emitted train.py gets ``--emulate``;
another program reads ``HAP_EMULATE_SLOWDOWN`` (the slowdowns by rank, comma-separated). PROGRAM
inherits the environment; hap-emulate sets the rendezvous (``MASTER_ADDR``, ``MASTER_PORT``). It
exits with the worst exit status of its nodes.

Namespaces are removed on exit, on Ctrl-C and on a crash of a node; a namespace whose launcher
(the pid in its name) is dead is removed by the next run, one of a live run is left alone. It needs
root (CAP_NET_ADMIN), ``ip`` and ``tc``; without them it stops with exit 2 and says so.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from hap.cluster import load_cluster
from hap.errors import HapError

SUBNET = "198.18.0"  # RFC 2544's benchmarking range (198.18.0.0/15), inside hap's namespaces only
NAME = re.compile(r"^hap(\d+)(b|n\d+)$")


class EmulationError(HapError):
    """The emulated cluster cannot be set up here: what is missing and what to do."""


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise EmulationError(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()}")


def check_tools() -> None:
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        raise EmulationError(f"hap-emulate needs {' and '.join(missing)} (iproute2); install it, or run on a machine "
                             "that has it")
    if os.geteuid() != 0:
        raise EmulationError("hap-emulate makes network namespaces and shapes links, which needs root "
                             "(CAP_NET_ADMIN); run it as root, e.g. with sudo")


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    """Is the launcher ``pid`` still running? A zombie (killed with -9, not yet reaped by its
    parent) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _delete(ns: str) -> None:
    """Kill what still runs in namespace ``ns`` (a launcher killed with -9 leaves its nodes' torchrun
    agents and workers running), then delete it."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in (int(x) for x in out.split() if x.isdigit()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def remove_leftovers() -> list[str]:
    """Remove the namespaces of launchers that are dead, and what runs in them; returns their names."""
    gone = []
    for ns in namespaces():
        m = NAME.match(ns)
        if m and not _alive(int(m.group(1))):
            _delete(ns)
            gone.append(ns)
    return gone


@contextlib.contextmanager
def emulated_network(nodes: int, gbps: float, pid: int | None = None) -> Iterator[list[str]]:
    """``nodes`` namespaces joined by a bridge, each link shaped to ``gbps`` both ways; yields the
    namespaces' names (node i has address 198.18.0.(i+1)). Removed when the block ends."""
    pid = pid or os.getpid()
    bridge, made = f"hap{pid}b", []
    names = [f"hap{pid}n{i}" for i in range(nodes)]
    rate = f"{max(gbps, 1e-3) * 1000:.3f}mbit"
    burst = f"{max(32, int(gbps * 1e9 / 8 / 250 / 1024))}kb"  # at least one 4 ms tick of the rate
    try:
        for ns in [bridge, *names]:
            _run("ip", "netns", "add", ns)
            made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", bridge, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", bridge, "link", "set", "br0", "up")
        for i, ns in enumerate(names):
            a, b = f"hv{pid}n{i}a", f"hv{pid}n{i}b"
            _run("ip", "link", "add", a, "netns", ns, "type", "veth", "peer", "name", b, "netns", bridge)
            _run("ip", "-n", ns, "link", "set", a, "name", "eth0")
            _run("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", bridge, "link", "set", b, "master", "br0")
            _run("ip", "-n", bridge, "link", "set", b, "up")
            for where, dev in ((ns, "eth0"), (bridge, b)):  # out of the node, and into it
                _run("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                     "burst", burst, "latency", "100ms")
        yield names
    finally:
        for ns in reversed(made):
            _delete(ns)


def is_emitted(program: str) -> bool:
    try:
        return "hr.Layout.build(" in Path(program).read_text(errors="replace")
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: hap-emulate CLUSTER.toml [--port P] -- PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(prog="hap-emulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("cluster")
    ap.add_argument("--port", type=int, default=29517, help="the rendezvous port on node 0 (default 29517)")
    args = ap.parse_args(argv[:cut])
    program = argv[cut + 1:]
    if not program:
        print("hap-emulate: give the program after --, e.g. -- out/train.py --steps 10", file=sys.stderr)
        return 2
    try:
        check_tools()
        cluster = load_cluster(args.cluster, measured=False)  # the links the file declares, not a measurement of them
    except (EmulationError, HapError, OSError) as e:
        print(f"hap-emulate: {e}", file=sys.stderr)
        return 2
    for ns in remove_leftovers():
        print(f"hap-emulate: removed {ns}, left by a run that is gone", file=sys.stderr)
    nodes = cluster.nodes()
    slowdowns = ",".join(f"{r.slowdown:g}" for r in cluster.ranks)
    gbps = cluster.inter_node.bytes_per_s * 8 / 1e9
    extra = ["--emulate"] if is_emitted(program[0]) and "--emulate" not in program else []
    # gloo and NCCL advertise the address of the interface they are given: the node's veth, whose
    # own address the kernel routes over loopback, so a node's ranks still talk unshaped
    # every emulated node runs on this machine's cores: each rank gets its share of them unless the
    # caller says otherwise (torchrun sets one thread a rank only for a node of several ranks, so a
    # one-rank node would take every core and its threads would fight the other nodes' ranks)
    threads = str(max(1, (os.cpu_count() or 1) // cluster.num_ranks))
    env = {"OMP_NUM_THREADS": threads, **os.environ, "MASTER_ADDR": f"{SUBNET}.1", "MASTER_PORT": str(args.port),
           "HAP_EMULATE_SLOWDOWN": slowdowns, "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    procs: list[subprocess.Popen] = []

    def stop(signum, frame):  # Ctrl-C or a kill: the nodes go, then the namespaces (finally below)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with emulated_network(len(nodes), gbps) as names:
            for i, (ns, ranks) in enumerate(zip(names, nodes)):
                cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
                       f"--nnodes={len(nodes)}", f"--node-rank={i}", f"--nproc-per-node={len(ranks)}",
                       f"--master-addr={SUBNET}.1", f"--master-port={args.port}", *program, *extra]
                procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
            codes = [p.wait() for p in procs]
    except EmulationError as e:
        print(f"hap-emulate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return max(codes, key=lambda c: (c != 0, abs(c)))


if __name__ == "__main__":
    sys.exit(main())

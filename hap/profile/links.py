"""``hap-profile --links CLUSTER.toml``: measure a cluster's links and write them into its file.

Run under torchrun across the cluster's nodes, one process per rank of the file (on an emulated
cluster: ``hap-profile --links CLUSTER.toml --emulated``, which runs it under ``hap-emulate``).
It measures, one link class at a time so that no measurement crowds another:

- **intra-node**, once per kind of node (the device of its first rank): point to point between
  two ranks of the node, and all-reduce and all-to-all over the node's ranks;
- **inter-node**: point to point between the first ranks of nodes 0 and 1, and all-reduce and
  all-to-all over every rank.

Each is fitted to α-β in the cost model's own formulas (``hap.machine.collective_s``): the point
to point pair is the link's, the collectives' pairs refine it per collective. An all-to-all over
nodes is bound by the node's one link, which the node's ranks share; the cost model divides the
link by that crowd (``Cluster.group_link``), so the fit is stored per link (multiplied back by the
crowd of the group it was measured on).

Where the measurement goes: the cluster file's ``[network.measured]`` table (see
``hap.cluster``), with its provenance. The device profiles keep what a device kind achieves; the
links are a property of one cluster, so they live in its file, and a plan made from the file
uses them.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .fit import _fit_formula

SIZES = [2**12, 2**16, 2**20, 2**22, 2**24]  # bytes: latency-bound to bandwidth-bound
QUICK_SIZES = [2**12, 2**18, 2**22, 2**24]
COLLECTIVES = ("all_reduce", "all_to_all")
SECTION = re.compile(r"^\s*\[network\.measured[\].]")
HEADER = re.compile(r"^\s*\[")
COMMENT = ("# written by `hap-profile --links`", "# alpha in")  # the section's own comment lines


def _classes(cluster) -> list[tuple[str, list[int]]]:
    """(link class, its ranks) in measuring order: one node of each device kind with 2+ ranks,
    then the whole cluster when it has 2+ nodes."""
    out, seen = [], set()
    nodes = cluster.nodes()
    for ranks in nodes:
        device = cluster.ranks[ranks[0]].device
        if len(ranks) > 1 and device not in seen:
            seen.add(device)
            out.append((f"intra_node.{device}", ranks))
    if len(nodes) > 1:
        out.append(("inter_node", list(range(cluster.num_ranks))))
    return out


def _timed(fn: Callable[[], Any], group, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn`` between barriers of ``group`` (a first call warms up); on a GPU
    the device is synchronized before each barrier, so the time is the transfer's."""
    import torch.distributed as dist

    def settle() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=group)

    samples = []
    for _ in range(repeats + 1):
        settle()
        t0 = time.perf_counter()
        fn()
        settle()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples[1:])


def measure(cluster, sizes: list[int], repeats: int, step: Callable[[str], None],
            device: torch.device) -> dict[str, Any]:
    """This rank's timings, by link class and operation: {class: {op: [[bytes, s], ...]}}. Call
    on every rank of the cluster at once."""
    import torch.distributed as dist

    rank, out = dist.get_rank(), {}
    cols = 256
    for name, ranks in _classes(cluster):
        pair = [ranks[0], next(r for r in ranks if cluster.ranks[r].node != cluster.ranks[ranks[0]].node)] \
            if name == "inter_node" else ranks[:2]
        pair_group, group = dist.new_group(pair), dist.new_group(ranks)  # every rank creates every group
        n = len(ranks)
        mine: dict[str, list[list[float]]] = {}
        for nbytes in sizes:
            step(f"{name} {nbytes / 2**20:g} MiB")
            rows = max(n, nbytes // (4 * cols))
            x = torch.ones(rows, cols, device=device)
            if rank in pair:
                src, dst = pair

                def p2p(x=x, src=src, dst=dst) -> None:
                    dist.send(x, dst) if rank == src else dist.recv(x, src)
                mine.setdefault("p2p", []).append([x.numel() * 4, _timed(p2p, pair_group, repeats, device)])
            if rank in ranks:  # the collectives hap.runtime runs, on this class's group
                rows -= rows % n
                x, y = torch.ones(rows, cols, device=device), torch.empty(rows, cols, device=device)
                mine.setdefault("all_reduce", []).append(
                    [x.numel() * 4, _timed(lambda x=x, g=group: dist.all_reduce(x, group=g), group, repeats, device)])
                mine.setdefault("all_to_all", []).append(  # collective_s's bytes: the tensor all ranks hold
                    [x.numel() * 4 * n, _timed(lambda x=x, y=y, g=group: dist.all_to_all_single(y, x, group=g), group,
                                           repeats, device)])
            dist.barrier()
        if rank == ranks[0]:
            out[name] = mine
    return out


def fit(timings: dict[str, dict[str, list[list[float]]]], cluster) -> dict[str, dict[str, Any]]:
    """Per link class: {"alpha_us", "gbps"} from point to point, and [alpha_us, gbps] per
    collective in ``collective_s``'s terms (all-to-all over nodes per link, see the module)."""
    from hap.cluster import link_crowd
    from hap.machine import Link, collective_s

    fitted, classes = {}, dict(_classes(cluster))
    for name, ops in timings.items():
        ranks = classes[name]
        # through the smallest and the largest transfers, as the collectives: a transfer within the
        # shaper's burst goes at the wire's speed, and a relative least-squares fit through it
        # doubled one emulated 0.5 Gbit/s link
        a, bw = _fit_formula([(1.0, b, t) for b, t in ops["p2p"]])
        entry: dict[str, Any] = {"alpha_us": _round(a * 1e6), "gbps": _round(bw * 8 / 1e9)}
        n = len(ranks)
        for kind in COLLECTIVES:
            form = "" if kind == "all_reduce" else "grouped"
            fr = (1 / n,) * n
            rows = [(collective_s(kind, b, fr, Link(1.0, 1e300), form), collective_s(kind, b, fr, Link(0.0, 1.0), form),
                     t) for b, t in ops[kind]]
            alpha, bw = _fit_formula(rows)
            if kind == "all_to_all" and name == "inter_node":  # per link, as Cluster.group_link divides it
                bw *= max(1.0, link_crowd([cluster.ranks[r].node for r in ranks]))
            entry[kind] = [_round(alpha * 1e6), _round(bw * 8 / 1e9)]
        fitted[name] = entry
    return fitted


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def section(fitted: dict[str, dict[str, Any]], cluster, backend: str) -> str:
    """The ``[network.measured]`` TOML text for ``fitted``."""
    at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def table(e: dict[str, Any]) -> str:
        parts = [f"alpha_us = {e['alpha_us']}", f"gbps = {e['gbps']}"]
        parts += [f"{k} = [{e[k][0]}, {e[k][1]}]" for k in COLLECTIVES]
        return "{ " + ", ".join(parts) + " }"

    lines = ["", f"{COMMENT[0]}: the measured links, which plans use instead of inter_node_gbps;",
             f"{COMMENT[1]} microseconds, bandwidth in Gbit/s; [alpha_us, gbps] per collective",
             "[network.measured]", 'by = "hap-profile --links"', f'at = "{at}"',
             f"ranks = {cluster.num_ranks}", f"nodes = {cluster.num_nodes}", f'backend = "{backend}"']
    if "inter_node" in fitted:
        lines.append(f"inter_node = {table(fitted['inter_node'])}")
    intra = {k.split(".", 1)[1]: v for k, v in fitted.items() if k.startswith("intra_node.")}
    if intra:
        lines.append("[network.measured.intra_node]")
        lines += [f"{json.dumps(d)} = {table(e)}" for d, e in intra.items()]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace the file's ``[network.measured]`` tables (and the comment above them) by ``text``,
    keeping every other line as it is; written to a temporary file, then renamed."""
    old = path.read_text().splitlines()
    keep, inside = [], False
    for line in old:
        if SECTION.match(line):
            inside = True
            while keep and keep[-1].startswith(COMMENT):
                keep.pop()
            continue
        if inside and HEADER.match(line):
            inside = False
        if not inside:
            keep.append(line)
    while keep and not keep[-1].strip():
        keep.pop()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(keep) + "\n" + text)
    os.replace(tmp, path)


def summary(fitted: dict[str, dict[str, Any]], typed_gbps: float | None) -> str:
    lines = [f"{'link':22s} {'p2p alpha':>10s} {'p2p Gbit/s':>11s} {'all-reduce':>18s} {'all-to-all':>18s}"]
    for name, e in fitted.items():
        coll = [f"{e[k][0]:7.0f} us {e[k][1]:6.3g}" for k in COLLECTIVES]
        lines.append(f"{name:22s} {e['alpha_us']:7.0f} us {e['gbps']:11.4g} {coll[0]:>18s} {coll[1]:>18s}")
    if typed_gbps is not None and "inter_node" in fitted:
        lines.append(f"inter-node: measured {fitted['inter_node']['gbps']:.4g} Gbit/s point to point; the file types "
                     f"inter_node_gbps = {typed_gbps:g}")
    return "\n".join(lines)


def run(cluster_path: str, cluster, quick: bool, repeats: int | None, out: str | None, device: torch.device,
        progress: Callable[[bool], Any]) -> int:
    """The measurement on this rank, under torchrun, of ``cluster`` (the file at ``cluster_path`` as
    it declares its links); rank 0 fits and writes. Returns the exit code. ``progress(enabled)``
    makes the progress bar (``launch._Progress``)."""
    import torch.distributed as dist

    import hap.runtime as hr

    hr.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    where: list[Any] = [None] * world
    dist.all_gather_object(where, int(os.environ.get("GROUP_RANK", "0")))
    expected = [r.node for r in cluster.ranks]
    if world != cluster.num_ranks or where != expected:
        if rank == 0:
            print(f"hap-profile: {cluster_path} has {cluster.num_ranks} ranks on nodes {expected}; this run has "
                  f"{world} on nodes {where}. Run one torchrun agent per node of the file "
                  f"(--nnodes {cluster.num_nodes}, --node-rank i, --nproc-per-node = the node's count), in the "
                  "file's order", flush=True)
        hr.shutdown()
        return 2
    sizes = QUICK_SIZES if quick else SIZES
    bar = progress(rank == 0)
    bar.total(len(_classes(cluster)) * len(sizes))
    try:
        mine = measure(cluster, sizes, repeats or (3 if quick else 5), bar.step, device)
    finally:
        bar.close()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    backend = dist.get_backend()
    hr.shutdown()
    if rank != 0:
        return 0
    timings = {k: v for part in gathered for k, v in part.items()}
    fitted = fit(timings, cluster)
    if not fitted:
        print(f"hap-profile: {cluster_path} has one rank per node and one node: it has no link to measure")
        return 2
    target = Path(out) if out else Path(cluster_path)
    if out:
        target.write_text(Path(cluster_path).read_text())
    write_section(target, section(fitted, cluster, backend))
    typed = cluster.inter_node.bytes_per_s * 8 / 1e9 if cluster.num_nodes > 1 else None
    samples = target.with_name(target.name + ".links.json")
    samples.write_text(json.dumps({"timings_s_by_bytes": timings, "fitted": fitted}, indent=1) + "\n")
    print(summary(fitted, typed))
    print(f"wrote [network.measured] into {target} (samples: {samples}); plans made from it use these links")
    return 0

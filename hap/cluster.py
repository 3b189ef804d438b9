"""The cluster: which device each rank is, how fast it computes, and the links between ranks.

A cluster file (TOML) lists kinds of machines; device profiles (JSON, in
`profiles/devices/`) say what one device of a kind achieves:

    name = "hap-paper"            # optional
    [network]                     # may be omitted when the cluster is one node
    inter_node_gbps = 10.4        # Gbit/s between nodes
    inter_node_alpha_us = 30      # optional, latency of one inter-node collective (default 30 us)
    [network.measured]            # optional: written by `hap-profile --links`, used instead of the typed pair
    [[nodes]]                     # one entry per kind of machine
    device = "V100-16GB"          # a profile name in profiles/devices/, or a path to a .json profile
    count = 8                     # devices (ranks) per node
    repeat = 2                    # identical nodes (default 1)
    slowdown = 1.0                # CPU emulation: this rank's forward + backward run N times slower (default 1)
    node = "localhost"            # optional: entries with the same node name share one machine

Measured links: `hap-profile --links CLUSTER.toml`, run under torchrun across the cluster (or
`--emulated`), writes `[network.measured]` (see ``hap.profile.links``): the inter-node link's α-β
and its all-reduce / all-to-all fits, and each node kind's intra-node link. A cluster with it
prices every collective by the measured links; the typed `inter_node_gbps` stays as the fallback
and for the record. Intra-node links measured this way override the device profile's for this
cluster only: the profile holds what one device kind achieves on its own node's links, the
cluster file what this cluster's links achieve.

Ranks are numbered in file order: entries, then repeats, then devices within a node.
Each (entry, repeat) is its own node unless entries share a `node` name; nodes are
numbered in order of first appearance.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hap.errors import ClusterFileError
from hap.machine import (  # noqa: F401  (the cluster file's vocabulary, re-exported)
    DeviceProfile,
    Link,
    _is_int,
    _is_number,
    known_devices,
    load_device,
    profiles_dir,
)

DEFAULT_INTER_NODE_ALPHA_US = 30.0
# collectives (and forms) whose every rank sends to every other rank at once
ALL_TO_ALL_PATTERN = ("all_to_all.padded", "all_to_all.grouped", "all_gather.grouped", "reduce_scatter.grouped")
_TOP_KEYS = ("name", "description", "network", "nodes")
_NETWORK_KEYS = ("inter_node_gbps", "inter_node_alpha_us", "measured")
_MEASURED_KEYS = ("by", "at", "ranks", "nodes", "backend", "inter_node", "intra_node")
_LINK_KEYS = ("alpha_us", "gbps", "all_reduce", "all_to_all")
_NODE_KEYS = ("device", "count", "repeat", "slowdown", "node")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    device: str  # key into Cluster.devices
    node: int
    slowdown: float


@dataclass(frozen=True)
class Cluster:
    name: str
    ranks: tuple[RankInfo, ...]
    devices: dict[str, DeviceProfile]
    inter_node: Link
    source: str  # the file it was loaded from, or a description
    # devices the file names "cpu": the machine that plans. Parsing gives them the shipped
    # profiles/devices/cpu.json; hap.calibrate.resolve gives them this machine's profile and
    # leaves this empty
    this_machine: tuple[str, ...] = ()
    # intra-node links measured on this cluster (hap-profile --links), by device: they replace
    # the device profile's ``intra_node`` here
    intra_node_measured: Mapping[str, Link] = dataclasses.field(default_factory=dict)
    links: str = "typed"  # where the links come from: "typed", or the measurement's provenance

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    @property
    def num_nodes(self) -> int:
        return len({r.node for r in self.ranks})

    def profile(self, rank: int) -> DeviceProfile:
        return self.devices[self.ranks[rank].device]

    def flop_rate(self, rank: int, op_class: str, dtype: str) -> float:
        """Achieved flop/s of `rank` for this op class and dtype, slowdown applied."""
        return self.profile(rank).compute_rate(op_class, dtype) / self.ranks[rank].slowdown

    def memory_rate(self, rank: int) -> float:
        """Achieved memory bandwidth of `rank` in bytes/s, slowdown applied."""
        return self.profile(rank).memory_bytes_per_s / self.ranks[rank].slowdown

    def kernel_floor(self, rank: int) -> float:
        """Seconds of the smallest op on `rank`, slowdown applied."""
        return self.profile(rank).kernel_floor_s * self.ranks[rank].slowdown

    def memory_bytes(self, rank: int) -> int:
        """The memory a plan may fill on ``rank``: its device's, less the device's reserve."""
        return self.profile(rank).usable_memory_bytes

    def speed(self, rank: int, precision: str = "fp32") -> float:
        """Relative speed of `rank` (matmul flop/s in ``precision``), for speed-proportional shares."""
        return self.flop_rate(rank, "matmul", precision)

    def group_link(self, ranks: Sequence[int] | None = None) -> Link:
        """The link a ring collective over `ranks` (default: all) is bound by.

        All on one node: the slowest intra-node link among their devices. Across nodes:
        the inter-node network (or a slower intra-node link, if one is), with the larger alpha.
        """
        members = range(self.num_ranks) if ranks is None else ranks
        infos = [self.ranks[r] for r in members]
        if not infos:
            raise ValueError("group_link needs at least one rank")
        links = [self.intra_link(i.device) for i in {i.device: i for i in infos}.values()]
        alpha = max(link.alpha_s for link in links)
        bandwidth = min(link.bytes_per_s for link in links)
        if len({i.node for i in infos}) == 1:
            # one device kind: its per-collective fits hold; mixed kinds: the conservative pair
            fits = links[0].collectives if len(links) == 1 else None
            return Link(alpha_s=alpha, bytes_per_s=bandwidth, collectives=fits)
        # measured per-collective fits of the inter-node link (hap-profile --links) refine its pair;
        # they were measured across the nodes, intra-node hops included, so their alpha stands
        measured = {key: (a, min(bandwidth, b)) for key, (a, b) in (self.inter_node.collectives or {}).items()}
        alpha, bandwidth = max(alpha, self.inter_node.alpha_s), min(bandwidth, self.inter_node.bytes_per_s)
        # every rank of a node sends through the node's one network link: a ring crosses it once
        # each way (as one rank's traffic), but in an all-to-all pattern (all-to-all, and the
        # grouped all-gather / reduce-scatter built on it) each of a node's g ranks sends the
        # share of its bytes bound for the other nodes' ranks through it at once
        crowd = link_crowd([i.node for i in infos])
        fits = dict(measured)
        if crowd > 1:
            for key in ALL_TO_ALL_PATTERN:
                a, b = measured.get(key, measured.get(key.split(".")[0], (alpha, bandwidth)))
                fits[key] = (a, b / crowd)
        return Link(alpha_s=alpha, bytes_per_s=bandwidth, collectives=fits or None)

    def intra_link(self, device: str) -> Link:
        """The link between two ranks of ``device`` on one node: measured on this cluster, or the profile's."""
        return self.intra_node_measured.get(device) or self.devices[device].intra_node

    def nodes(self) -> list[list[int]]:
        """Ranks of each node, by node index."""
        out: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for r in self.ranks:
            out[r.node].append(r.rank)
        return out

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "source": self.source,
            "inter_node": _link_json(self.inter_node),
            "links": self.links,
            "ranks": [
                {"rank": r.rank, "device": r.device, "node": r.node, "slowdown": r.slowdown}
                for r in self.ranks
            ],
            "devices": {name: p.to_json() for name, p in self.devices.items()},
        }
        if self.intra_node_measured:
            out["intra_node_measured"] = {d: _link_json(link) for d, link in self.intra_node_measured.items()}
        if self.this_machine:  # a resolved cluster (a plan's) holds every device's own numbers
            out["this_machine"] = list(self.this_machine)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Cluster:
        try:
            cluster = cls(
                name=d["name"],
                ranks=tuple(
                    RankInfo(
                        rank=int(r["rank"]),
                        device=r["device"],
                        node=int(r["node"]),
                        slowdown=float(r["slowdown"]),
                    )
                    for r in d["ranks"]
                ),
                devices={
                    name: DeviceProfile.from_json(p, f"cluster JSON, devices.{name}")
                    for name, p in d["devices"].items()
                },
                inter_node=_link_from_json(d["inter_node"]),
                source=d.get("source", "<json>"),
                this_machine=tuple(str(name) for name in d.get("this_machine", ())),
                intra_node_measured={k: _link_from_json(v) for k, v in d.get("intra_node_measured", {}).items()},
                links=str(d.get("links", "typed")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ClusterFileError(
                f"cluster JSON is malformed ({type(e).__name__}: {e}); write it with Cluster.to_json"
            ) from None
        cluster.lint()
        return cluster

    def lint(self) -> None:
        """Raise ClusterFileError unless ranks are 0..n-1, nodes 0..m-1, every device has a
        profile and every rate is positive."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ClusterFileError(f"cluster {self.name}: {what}")

        need(bool(self.ranks), "a cluster has at least one rank")
        need([r.rank for r in self.ranks] == list(range(len(self.ranks))), "ranks are numbered 0..n-1 in order")
        need({r.node for r in self.ranks} == set(range(self.num_nodes)), "nodes are numbered 0..m-1")
        for r in self.ranks:
            need(r.device in self.devices, f"rank {r.rank}: device {r.device!r} has no profile")
            need(r.slowdown > 0 and math.isfinite(r.slowdown), f"rank {r.rank}: slowdown {r.slowdown} is not > 0")
        for name, link in self.intra_node_measured.items():
            need(name in self.devices and link.bytes_per_s > 0, f"measured intra-node link of {name!r} is unusable")
        for name, p in self.devices.items():
            need(p.memory_bytes > 0, f"device {name}: memory must be > 0")
            need(p.memory_bytes_per_s > 0 and p.kernel_floor_s >= 0, f"device {name}: memory bandwidth must be > 0")
            need(p.intra_node.bytes_per_s > 0 and p.intra_node.alpha_s >= 0,
                 f"device {name}: intra-node link bandwidth must be > 0")
            need(all(v > 0 for rates in p.flop_per_s.values() for v in rates.values()),
                 f"device {name}: every compute rate must be > 0")
            need(p.flop_per_s.get("matmul", {}).get("fp32", 0) > 0, f"device {name}: needs a matmul fp32 rate")
        need(self.inter_node.bytes_per_s > 0 and self.inter_node.alpha_s >= 0, "inter-node bandwidth must be > 0")


def ranks_text(ranks: Sequence[int]) -> str:
    """``0..7, 16`` for ranks 0 to 7 and 16: how notes, tables and pictures name a set of ranks."""
    ranks = list(ranks)
    runs, start = [], ranks[0]
    for a, b in zip(ranks, [*ranks[1:], None]):
        if b != a + 1:
            runs.append(str(start) if start == a else f"{start}..{a}")
            start = b
    return ", ".join(runs)


def load_cluster(path: str | Path | None = None, measured: bool = True) -> Cluster:
    """Load a cluster TOML file; None means profiles/clusters/default.toml.

    A bare name ("hap-paper") that is not an existing file is looked up in profiles/clusters/.
    ``measured=False`` ignores ``[network.measured]``: the cluster as the file declares it, which
    is what hap-emulate builds (and then measures again).
    """
    file = _cluster_path(path)
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ClusterFileError(f"{file}: TOML syntax error: {e}") from None
    except OSError as e:
        raise ClusterFileError(f"cluster file {file} cannot be read: {e.strerror or e}") from None
    return cluster_from_dict(data, source=str(file), base_dir=file.parent, measured=measured)


def cluster_from_dict(
    data: Mapping[str, Any], source: str = "<dict>", base_dir: Path | None = None, measured: bool = True
) -> Cluster:
    """Build a Cluster from the parsed TOML document (see the module docstring for the format).

    Device "cpu" gets the shipped profiles/devices/cpu.json and is named in
    ``Cluster.this_machine``; ``hap.calibrate.resolve`` gives it this machine's profile."""
    _check_keys(data, _TOP_KEYS, source, "top level")
    name = data.get("name", Path(source).stem if source.endswith(".toml") else "cluster")
    if not isinstance(name, str):
        raise ClusterFileError(f"{source}: 'name' must be a string, got {name!r}")
    entries = [_parse_entry(entry, i, source) for i, entry in enumerate(_node_tables(data, source))]
    devices, by_ref = _load_profiles(entries, base_dir)
    ranks, num_nodes = _build_ranks(entries, by_ref)
    inter = _inter_node_link(data.get("network"), num_nodes, devices, source)
    this_machine = tuple(dict.fromkeys(by_ref[e.device] for e in entries if _is_this_machine(e.device)))
    links, intra = "typed", {}
    table = (data.get("network") or {}).get("measured")
    if table is not None and measured:
        inter, intra, links = _measured_links(table, inter, num_nodes, {e.device: by_ref[e.device] for e in entries},
                                              source)
    cluster = Cluster(name=name, ranks=ranks, devices=devices, inter_node=inter, source=source,
                      this_machine=this_machine, intra_node_measured=intra, links=links)
    cluster.lint()
    return cluster


# --- parsing, one job each -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One checked [[nodes]] entry."""

    where: str  # "<source>, nodes[i]", the prefix of its error messages
    device: str  # the device reference as written
    count: int
    repeat: int
    slowdown: float
    node: str | None  # the machine's name, or None: each repeat is a machine of its own


def _node_tables(data: Mapping[str, Any], source: str) -> list[Mapping[str, Any]]:
    entries = data.get("nodes")
    if not entries:
        raise ClusterFileError(
            f"{source}: no [[nodes]] entries; add at least one, e.g.\n"
            '  [[nodes]]\n  device = "cpu"\n  count = 2\n'
            f"(see {profiles_dir() / 'clusters'} for examples)"
        )
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ClusterFileError(f"{source}: 'nodes' must be an array of tables, written [[nodes]]")
    return entries


def _parse_entry(entry: Mapping[str, Any], i: int, source: str) -> _Entry:
    where = f"{source}, nodes[{i}]"
    _check_keys(entry, _NODE_KEYS, source, f"nodes[{i}]")
    ref = entry.get("device")
    if not isinstance(ref, str) or not ref:
        raise ClusterFileError(
            f'{where}: \'device\' is required, a profile name such as "V100-16GB" or "cpu" '
            f"(known: {', '.join(known_devices())})"
        )
    count = _positive_int(entry.get("count", None), "count", where)
    repeat = _positive_int(entry.get("repeat", 1), "repeat", where)
    slowdown = entry.get("slowdown", 1.0)
    if not _is_number(slowdown) or not slowdown > 0 or not math.isfinite(slowdown):
        raise ClusterFileError(
            f"{where}: 'slowdown' must be a number > 0 (1 = full speed, 3 = three times slower), "
            f"got {slowdown!r}"
        )
    node_name = entry.get("node")
    if node_name is not None and not isinstance(node_name, str):
        raise ClusterFileError(f"{where}: 'node' must be a string naming the machine, got {node_name!r}")
    if node_name is not None and repeat != 1:
        raise ClusterFileError(
            f"{where}: 'repeat = {repeat}' with 'node = \"{node_name}\"': a named node is one machine; "
            "raise 'count' instead, or drop 'node' to get repeat separate machines"
        )
    return _Entry(where, ref, count, repeat, float(slowdown), node_name)


def _load_profiles(entries: Sequence[_Entry], base_dir: Path | None) -> tuple[dict[str, DeviceProfile], dict[str, str]]:
    """The profile of each device the entries name (by profile name), and each device reference
    as written -> its profile name."""
    devices: dict[str, DeviceProfile] = {}
    by_ref: dict[str, str] = {}
    for e in entries:
        if e.device in by_ref:
            continue
        profile = _device_profile(e.device, base_dir, e.where)
        if profile.name in devices and devices[profile.name] != profile:
            raise ClusterFileError(f"{e.where}: two different profiles are both named {profile.name!r}")
        devices[profile.name] = profile
        by_ref[e.device] = profile.name
    return devices, by_ref


def _device_profile(ref: str, base_dir: Path | None, where: str) -> DeviceProfile:
    """A device reference's profile: a .json path (relative to the cluster file's folder when it
    exists there) or a name in profiles/devices/."""
    try:
        if ref.endswith(".json") and base_dir is not None and not Path(ref).is_absolute():
            candidate = base_dir / ref
            return load_device(candidate if candidate.exists() else ref)
        return load_device(ref)
    except ClusterFileError as e:
        raise ClusterFileError(f"{where}: {e}") from None


def _is_this_machine(ref: str) -> bool:
    """Device "cpu" is the machine that plans: its profile is measured there, not shipped."""
    return ref.strip().lower() == "cpu"


def _build_ranks(entries: Sequence[_Entry], by_ref: Mapping[str, str]) -> tuple[tuple[RankInfo, ...], int]:
    """The ranks, and the number of nodes. Each (entry, repeat) is a node of its own unless
    entries share a node name; nodes are numbered in order of first appearance."""
    ranks: list[RankInfo] = []
    node_ids: dict[str, int] = {}
    num_nodes = 0
    for e in entries:
        for _ in range(e.repeat):
            if e.node is None:
                node = num_nodes
                num_nodes += 1
            elif e.node in node_ids:
                node = node_ids[e.node]
            else:
                node = node_ids[e.node] = num_nodes
                num_nodes += 1
            ranks.extend(RankInfo(rank=len(ranks), device=by_ref[e.device], node=node, slowdown=e.slowdown)
                         for _ in range(e.count))
    # ranks are numbered node by node, as torchrun gives each node (in --node-rank order) a
    # contiguous block; entries of one node need not be next to each other in the file
    ordered = sorted(ranks, key=lambda r: r.node)
    return tuple(dataclasses.replace(r, rank=i) for i, r in enumerate(ordered)), num_nodes


def _inter_node_link(network: Any, num_nodes: int, devices: Mapping[str, DeviceProfile], source: str) -> Link:
    """The [network] table as a Link. One node never uses the network: without [network] the
    node's own slowest link stands in."""
    if network is not None and not isinstance(network, Mapping):
        raise ClusterFileError(f"{source}: 'network' must be a table, written [network]")
    network = network or {}
    _check_keys(network, _NETWORK_KEYS, source, "[network]")
    alpha_us = network.get("inter_node_alpha_us", DEFAULT_INTER_NODE_ALPHA_US)
    if not _is_number(alpha_us) or alpha_us < 0 or not math.isfinite(alpha_us):
        raise ClusterFileError(
            f"{source}: [network] inter_node_alpha_us must be a number >= 0, got {alpha_us!r}"
        )
    gbps = network.get("inter_node_gbps")
    if gbps is None:
        if num_nodes > 1:
            raise ClusterFileError(
                f"{source}: {num_nodes} nodes but no network bandwidth; add\n"
                "  [network]\n  inter_node_gbps = 10   # Gbit/s between nodes"
            )
        slowest = min((p.intra_node for p in devices.values()), key=lambda link: link.bytes_per_s)
        return Link(alpha_s=max(slowest.alpha_s, alpha_us / 1e6), bytes_per_s=slowest.bytes_per_s)
    if not _is_number(gbps) or not gbps > 0 or not math.isfinite(gbps):
        raise ClusterFileError(
            f"{source}: [network] inter_node_gbps must be a number > 0 (Gbit/s, e.g. 10.4), got {gbps!r}"
        )
    return Link(alpha_s=alpha_us / 1e6, bytes_per_s=gbps * 1e9 / 8)


def link_crowd(nodes: Sequence[int]) -> float:
    """How many ranks' traffic an all-to-all pattern over ranks on ``nodes`` (each rank's node)
    puts through the busiest node's one link at once: g·(N−g)/(N−1), for g ranks of N on it."""
    n = len(nodes)
    g = max(nodes.count(node) for node in set(nodes))
    return g * (n - g) / (n - 1) if n > 1 else 1.0


def _measured_links(measured: Any, typed: Link, num_nodes: int, by_ref: Mapping[str, str],
                    source: str) -> tuple[Link, dict[str, Link], str]:
    """``[network.measured]`` (written by hap-profile --links): the inter-node link, the intra-node
    links by device, and the provenance line."""
    where = f"{source}: [network.measured]"
    if not isinstance(measured, Mapping):
        raise ClusterFileError(f"{where} must be a table; re-run `hap-profile --links {source}` to rewrite it")
    _check_keys(measured, _MEASURED_KEYS, source, "[network.measured]")
    if num_nodes > 1 and measured.get("nodes", num_nodes) != num_nodes:
        raise ClusterFileError(f"{where} was measured on {measured.get('nodes')} nodes, the file has {num_nodes}; "
                               f"re-run `hap-profile --links {source}`")

    def link(table: Any, what: str) -> Link:
        if not isinstance(table, Mapping):
            raise ClusterFileError(f"{where}: {what} must be a table of alpha_us and gbps")
        _check_keys(table, _LINK_KEYS, source, f"[network.measured] {what}")
        pairs = {"link": (table.get("alpha_us"), table.get("gbps"))}
        pairs.update({k: tuple(table[k]) if isinstance(table[k], list) else (None, None)
                      for k in ("all_reduce", "all_to_all") if k in table})
        for key, (a, g) in pairs.items():
            if not (_is_number(a) and a >= 0 and _is_number(g) and g > 0 and math.isfinite(a) and math.isfinite(g)):
                raise ClusterFileError(f"{where}: {what} {key} needs alpha_us >= 0 and gbps > 0, got {a!r}, {g!r}")
        return Link(alpha_s=pairs["link"][0] / 1e6, bytes_per_s=pairs["link"][1] * 1e9 / 8,
                    collectives={k: (a / 1e6, g * 1e9 / 8) for k, (a, g) in pairs.items() if k != "link"} or None)

    inter = link(measured["inter_node"], "inter_node") if "inter_node" in measured else typed
    intra_table = measured.get("intra_node", {})
    if not isinstance(intra_table, Mapping):
        raise ClusterFileError(f"{where}: intra_node must be a table of device = {{alpha_us, gbps}}")
    unknown = [d for d in intra_table if d not in by_ref]
    if unknown:
        raise ClusterFileError(f"{where}: intra_node names {', '.join(map(repr, unknown))}, which no [[nodes]] entry "
                               f"uses (devices: {', '.join(map(repr, by_ref))})")
    intra = {by_ref[d]: link(t, f"intra_node.{d}") for d, t in intra_table.items()}
    provenance = f"measured by {measured.get('by', 'hap-profile --links')}" + \
        (f" at {measured['at']}" if "at" in measured else "")
    return inter, intra, provenance


def _link_json(link: Link) -> dict[str, Any]:
    out: dict[str, Any] = {"alpha_s": link.alpha_s, "bytes_per_s": link.bytes_per_s}
    if link.collectives:
        out["collectives"] = {k: [a, b] for k, (a, b) in link.collectives.items()}
    return out


def _link_from_json(d: Mapping[str, Any]) -> Link:
    fits = {k: (float(a), float(b)) for k, (a, b) in d.get("collectives", {}).items()}
    return Link(alpha_s=float(d["alpha_s"]), bytes_per_s=float(d["bytes_per_s"]), collectives=fits or None)


# --- helpers -------------------------------------------------------------------------------------


def _positive_int(value: Any, key: str, where: str) -> int:
    if value is None:
        raise ClusterFileError(
            f"{where}: '{key}' is required: the number of devices (ranks) per node, e.g. 8"
        )
    if not _is_int(value) or value <= 0:
        raise ClusterFileError(f"{where}: '{key}' must be an integer >= 1, got {value!r}")
    return value


def _check_keys(table: Mapping[str, Any], allowed: Sequence[str], source: str, where: str) -> None:
    unknown = [k for k in table if k not in allowed]
    if unknown:
        hints = [difflib.get_close_matches(k, allowed, n=1) for k in unknown]
        hint = "".join(f" (did you mean '{h[0]}'?)" for h in hints if h)
        raise ClusterFileError(
            f"{source}: unknown key {', '.join(repr(k) for k in unknown)} in {where}{hint}; "
            f"allowed keys: {', '.join(allowed)}"
        )


def _cluster_path(path: str | Path | None) -> Path:
    clusters = profiles_dir() / "clusters"
    if path is None:
        file = clusters / "default.toml"
    else:
        file = Path(path)
        if (
            not file.exists()
            and file.suffix == ""
            and len(file.parts) == 1
            and (clusters / f"{file}.toml").exists()
        ):
            file = clusters / f"{file}.toml"
    if not file.is_file():
        examples = ", ".join(sorted(p.name for p in clusters.glob("*.toml"))) if clusters.is_dir() else ""
        what = "is a directory, not a cluster file" if file.is_dir() else "does not exist"
        inside = sorted(p.name for p in file.glob("*.toml")) if file.is_dir() else []
        hint = f"; did you mean {file / inside[0]}?" if inside else ""
        raise ClusterFileError(
            f"cluster file {file} {what}{hint}; give a TOML file, see {clusters}/ for examples"
            + (f" ({examples})" if examples else "")
        )
    return file

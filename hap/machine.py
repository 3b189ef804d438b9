"""Machine facts, the bottom layer: device profiles (achieved rates per op class and dtype,
memory, the intra-node link), the α-β model of a collective over a link, and what this
machine's CPU is. The cluster file, the cost model, the profiler and the calibration all
import these; this module imports nothing else of hap but its errors.
"""
from __future__ import annotations

import difflib
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hap.errors import ClusterFileError

_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "tensorfloat32": "tf32",
}


@dataclass(frozen=True)
class Link:
    """α-β model of a link: a message of b bytes takes alpha_s + b / bytes_per_s.

    ``collectives`` optionally refines it per collective ("all_reduce", "all_gather.padded",
    "all_to_all.grouped", ...): the (alpha_s, bytes_per_s) that ``collective_s``'s formula
    for that collective was fitted to by hap-profile on this link; others use the link's pair.
    """

    alpha_s: float
    bytes_per_s: float
    collectives: Mapping[str, tuple[float, float]] | None = field(default=None, compare=False, hash=False)

    def for_collective(self, key: str) -> tuple[float, float]:
        """(alpha_s, bytes_per_s) for a collective key such as "all_gather.padded"."""
        fits = self.collectives or {}
        if key in fits:
            return fits[key]
        kind = key.split(".")[0]
        return fits.get(kind, (self.alpha_s, self.bytes_per_s))

    def time_s(self, nbytes: float) -> float:
        return self.alpha_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class DeviceProfile:
    """Achieved (not peak) rates of one device kind; `provenance` says where each number came from."""

    name: str
    memory_bytes: int
    flop_per_s: dict[str, dict[str, float]]
    memory_bytes_per_s: float
    kernel_floor_s: float
    intra_node: Link
    intra_node_kind: str
    provenance: dict[str, str]
    measure_ops: bool = False  # plan-time timing of matmul-class ops on this machine (hap.optimer)
    overlap_comm: bool = True  # collectives can run while the device computes (False: CPU ranks share cores)
    memory_reserve_bytes: int = 0  # kept free below memory_bytes: the CUDA context and NCCL's buffers
    host_bytes_per_s: float | None = None  # host -> device copy rate (PCIe); None: the batch is in host memory

    @property
    def usable_memory_bytes(self) -> int:
        """What a plan may fill: the device's memory less the reserve."""
        return self.memory_bytes - self.memory_reserve_bytes

    def compute_rate(self, op_class: str, dtype: str) -> float:
        """Achieved flop/s for an op class ("matmul", "conv", "attention", ...) and dtype.

        An unknown op class counts as "matmul"; an unknown dtype gets the class's fp32 rate.
        """
        rates = self.flop_per_s.get(op_class) or self.flop_per_s["matmul"]
        key = _normalize_dtype(dtype)
        if key in rates:
            return rates[key]
        return rates.get("fp32", self.flop_per_s["matmul"]["fp32"])

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "memory_bytes": self.memory_bytes,
            "flop_per_s": {c: dict(r) for c, r in self.flop_per_s.items()},
            "memory_bytes_per_s": self.memory_bytes_per_s,
            "kernel_floor_s": self.kernel_floor_s,
            "intra_node": {
                "kind": self.intra_node_kind,
                "bytes_per_s": self.intra_node.bytes_per_s,
                "alpha_s": self.intra_node.alpha_s,
                **({"collectives": {k: {"alpha_s": a, "bytes_per_s": b}
                                    for k, (a, b) in self.intra_node.collectives.items()}}
                   if self.intra_node.collectives else {}),
            },
            "provenance": dict(self.provenance),
            **({"measure_ops": True} if self.measure_ops else {}),
            **({"overlap_comm": False} if not self.overlap_comm else {}),
            **({"memory_reserve_bytes": self.memory_reserve_bytes} if self.memory_reserve_bytes else {}),
            **({"host_bytes_per_s": self.host_bytes_per_s} if self.host_bytes_per_s else {}),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "device profile") -> DeviceProfile:
        """Build from the profile JSON format; ClusterFileError (naming `where`) if malformed."""
        if not isinstance(d, Mapping):
            raise ClusterFileError(f"{where}: a device profile must be a JSON object, got {type(d).__name__}")
        fix = "see profiles/devices/V100-16GB.json for the format"

        def need(key: str, container: Mapping[str, Any] = d, path: str = "") -> Any:
            if key not in container:
                raise ClusterFileError(f"{where}: missing key '{path}{key}' ({fix})")
            return container[key]

        def number(value: Any, path: str, positive: bool = True) -> float:
            ok = _is_number(value) and (value > 0 if positive else value >= 0)
            if not ok:
                want = "a number > 0" if positive else "a number >= 0"
                raise ClusterFileError(f"{where}: '{path}' must be {want}, got {value!r} ({fix})")
            return float(value)

        name = need("name")
        if not isinstance(name, str) or not name:
            raise ClusterFileError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        memory = need("memory_bytes")
        if not _is_int(memory) or memory <= 0:
            raise ClusterFileError(f"{where}: 'memory_bytes' must be an integer > 0, got {memory!r} ({fix})")
        flops_raw = need("flop_per_s")
        if not isinstance(flops_raw, Mapping):
            raise ClusterFileError(f"{where}: 'flop_per_s' must be an object of op class -> dtype -> flop/s")
        flops: dict[str, dict[str, float]] = {}
        for op_class, rates in flops_raw.items():
            if not isinstance(rates, Mapping) or not rates:
                raise ClusterFileError(
                    f"{where}: 'flop_per_s.{op_class}' must be a non-empty object of dtype -> flop/s ({fix})"
                )
            flops[op_class] = {dt: number(v, f"flop_per_s.{op_class}.{dt}") for dt, v in rates.items()}
        if "fp32" not in flops.get("matmul", {}):
            raise ClusterFileError(
                f"{where}: missing key 'flop_per_s.matmul.fp32' (the fallback rate; {fix})"
            )
        link = need("intra_node")
        if not isinstance(link, Mapping):
            raise ClusterFileError(f"{where}: 'intra_node' must be an object with kind, bytes_per_s, alpha_s")
        kind = need("kind", link, "intra_node.")
        if not isinstance(kind, str):
            raise ClusterFileError(f"{where}: 'intra_node.kind' must be a string such as 'nvlink', 'pcie'")
        fits: dict[str, tuple[float, float]] = {}
        raw_fits = link.get("collectives", {})
        if not isinstance(raw_fits, Mapping):
            raise ClusterFileError(f"{where}: 'intra_node.collectives' must be an object of collective -> "
                                   "{alpha_s, bytes_per_s} (written by hap-profile)")
        for key, fit in raw_fits.items():
            path = f"intra_node.collectives.{key}."
            if not isinstance(fit, Mapping):
                raise ClusterFileError(f"{where}: '{path[:-1]}' must be an object with alpha_s and bytes_per_s")
            fits[key] = (number(need("alpha_s", fit, path), path + "alpha_s", positive=False),
                         number(need("bytes_per_s", fit, path), path + "bytes_per_s"))
        provenance = d.get("provenance", {})
        if not isinstance(provenance, Mapping) or not all(isinstance(v, str) for v in provenance.values()):
            raise ClusterFileError(f"{where}: 'provenance' must be an object of key path -> source string")
        return cls(
            name=name,
            memory_bytes=int(memory),
            flop_per_s=flops,
            memory_bytes_per_s=number(need("memory_bytes_per_s"), "memory_bytes_per_s"),
            kernel_floor_s=number(need("kernel_floor_s"), "kernel_floor_s", positive=False),
            intra_node=Link(
                alpha_s=number(need("alpha_s", link, "intra_node."), "intra_node.alpha_s", positive=False),
                bytes_per_s=number(need("bytes_per_s", link, "intra_node."), "intra_node.bytes_per_s"),
                collectives=fits or None,
            ),
            intra_node_kind=kind,
            provenance=dict(provenance),
            measure_ops=bool(d.get("measure_ops", False)),
            overlap_comm=bool(d.get("overlap_comm", True)),
            memory_reserve_bytes=int(d.get("memory_reserve_bytes", 0)),
            host_bytes_per_s=(number(d["host_bytes_per_s"], "host_bytes_per_s") if "host_bytes_per_s" in d
                              else None),
        )


def profiles_dir() -> Path:
    """$HAP_PROFILES if set, else the repository's profiles/ folder."""
    env = os.environ.get("HAP_PROFILES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "profiles"


def known_devices() -> list[str]:
    folder = profiles_dir() / "devices"
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_device(name_or_path: str | Path) -> DeviceProfile:
    """A profile by name (profiles/devices/<name>.json, case-insensitive) or by path to a .json file."""
    path = _device_path(str(name_or_path))
    try:
        text = path.read_text()
    except OSError as e:
        raise ClusterFileError(f"device profile {path} cannot be read: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClusterFileError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    return DeviceProfile.from_json(data, str(path))


def _normalize_dtype(dtype: Any) -> str:
    key = str(dtype).lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(key, key)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _device_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or os.sep in name_or_path or "/" in name_or_path:
        if path.is_file():
            return path
        raise ClusterFileError(
            f"device profile {path} does not exist (profiles live in {profiles_dir() / 'devices'})"
        )
    folder = profiles_dir() / "devices"
    exact = folder / f"{name_or_path}.json"
    if exact.is_file():
        return exact
    known = known_devices()
    folded = [k for k in known if k.lower() == name_or_path.lower()]
    if len(folded) == 1:
        return folder / f"{folded[0]}.json"
    by_upper = {k.upper(): k for k in known}
    close = [
        by_upper[k] for k in difflib.get_close_matches(name_or_path.upper(), list(by_upper), n=3, cutoff=0.5)
    ]
    suggestion = f"Closest known: {', '.join(close)}. " if close else ""
    raise ClusterFileError(
        f"unknown device {name_or_path!r}. {suggestion}Known devices: {', '.join(known) or '(none)'}. "
        f"To add one, write {folder / (name_or_path + '.json')} (copy a profile there and edit it), "
        "or set HAP_PROFILES to another profiles folder"
    )


# --- the α-β model of a collective over uneven shards (the cost model's and the profiler's fits) ---


def collective_s(kind: str, nbytes: float, fracs: tuple[float, ...], link: Link, form: str,
                 fracs_dst: tuple[float, ...] | None = None) -> float:
    """α-β time of a collective over a tensor of ``nbytes`` split by ``fracs`` (see ``wire_bytes``)."""
    n = len(fracs)
    if n <= 1 or nbytes == 0:
        return 0.0
    a, bw = link.for_collective(kind if kind == "all_reduce" else f"{kind}.{form}")
    latency = {"all_reduce": 2 * (n - 1), "padded": n - 1}.get(kind if kind == "all_reduce" else form, n)
    return latency * a + wire_bytes(kind, nbytes, fracs, form, fracs_dst) / bw


def wire_bytes(kind: str, nbytes: float, fracs: tuple[float, ...], form: str,
               fracs_dst: tuple[float, ...] | None = None) -> float:
    """Bytes the busiest rank sends or receives (a full-duplex link carries both at once) in
    ``hap.runtime``'s implementation of the collective:

      all-reduce          2(N-1)/N · T                        (ring)
      all-gather padded   (N-1) · max f · T                   (every shard padded to the largest)
      all-gather grouped  max_r max((N-1) f_r, 1 - f_r) · T   (an all-to-all: rank r sends its
                                                               shard to each of the N-1 others)
      reduce-scatter      the same as all-gather (its dual)
      all-to-all padded   (N-1) · max f_src · max f_dst · T
      all-to-all grouped  max_r max(f_src,r (1 - f_dst,r), f_dst,r (1 - f_src,r)) · T
    """
    n = len(fracs)
    if kind == "all_reduce":
        return 2 * (n - 1) / n * nbytes
    if kind in ("all_gather", "reduce_scatter"):
        if form == "padded":
            return (n - 1) * max(fracs) * nbytes
        return max(max((n - 1) * f, 1 - f) for f in fracs) * nbytes
    if kind == "all_to_all":
        fd = fracs_dst or fracs
        if form == "padded":
            return (n - 1) * max(fracs) * max(fd) * nbytes
        return max(max(fs * (1 - fdd), fdd * (1 - fs)) for fs, fdd in zip(fracs, fd)) * nbytes
    raise ValueError(kind)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"

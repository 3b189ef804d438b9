"""``device = "cpu"`` on a fresh machine: measure this machine once, on first use, and cache it.

The shipped ``profiles/devices/cpu.json`` was measured on the development machine; another
machine (or the same VM type on a busier host) computes and communicates at other rates, and
an emulated CPU cluster's predicted step time would be off by that ratio. So parsing a cluster
file gives ``device = "cpu"`` the shipped profile and reads neither the environment nor the
cache. The planner calls ``resolve`` where the cost of "cpu" is first needed; on a machine
without a cached profile it runs ``hap-profile --quick`` (2 single-thread processes, ~20 s,
progress on stderr) and caches the profile under ``$HAP_CACHE_DIR`` (default
``~/.cache/hap``), keyed by host, CPU model and torch version; later plans read the cache.
The cached profile also sets ``measure_ops``: planning then times each matmul-class node at
the exact per-rank shapes on this CPU (``hap.optimer``).

``HAP_CPU_PROFILE`` chooses: ``auto`` (default: cache, else calibrate), ``shipped`` (the
shipped numbers, no measuring: what the test suite uses, for reproducible plans), or a path
to a profile JSON. Delete the cache file (its path is printed) to recalibrate.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hap.errors import ClusterFileError
from hap.machine import DeviceProfile, cpu_model, load_device

if TYPE_CHECKING:
    from hap.cluster import Cluster

MODES = ("auto", "shipped")
# the α-β fits are made in hap.machine.collective_s's terms: a cached calibration made under
# other formulas (or by a profiler of another suite) is measured again
PROFILE_VERSION = 2


def mode() -> str:
    return os.environ.get("HAP_CPU_PROFILE", "auto").strip() or "auto"


def cache_dir() -> Path:
    root = os.environ.get("HAP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hap")
    return Path(root)


def cache_path() -> Path:
    key = (f"{socket.gethostname()}-{cpu_model()}-torch{torch.__version__}-{platform.python_version()}"
           f"-v{PROFILE_VERSION}")
    return cache_dir() / ("cpu-" + re.sub(r"[^A-Za-z0-9_.+-]+", "_", key)[:150] + ".json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def calibrate(out: Path) -> dict:
    """Run ``hap-profile --quick`` on 2 processes into ``out``; return the profile dict."""
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"hap: calibrating device \"cpu\" on this machine (first use, ~20 s; cached in {out})",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = Path(tmp) / "cpu.json"
        cmd = [sys.executable, "-m", "hap.profile", "--quick", "--nproc", "2", "--port", str(_free_port()),
               "--out", str(tmp_out)]
        # CUDA hidden: on a GPU machine the profiler would otherwise measure cuda:0 and cuda:1
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        p = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env, timeout=600)
        if p.returncode != 0 or not tmp_out.exists():
            raise ClusterFileError(
                f"calibrating device \"cpu\" failed (`{' '.join(cmd)}` exited {p.returncode}); "
                "set HAP_CPU_PROFILE=shipped to plan with the shipped profiles/devices/cpu.json")
        profile = json.loads(tmp_out.read_text())
    profile["name"] = "cpu"
    profile["measure_ops"] = True
    profile.setdefault("provenance", {})["calibration"] = (
        "on first use of device \"cpu\" by hap.calibrate (hap-profile --quick, 2 processes); "
        f"delete {out} to recalibrate")
    tmp_file = out.with_suffix(".tmp")
    tmp_file.write_text(json.dumps(profile, indent=1) + "\n")
    tmp_file.replace(out)  # atomic: a concurrent planner never reads half a file
    return profile


def _profile_now() -> tuple[DeviceProfile | None, bool]:
    """What device "cpu" is without measuring anything: (a profile, or None for the shipped
    profiles/devices/cpu.json; whether this machine still has to be measured)."""
    m = mode()
    if m == "shipped":
        return None, False
    if m != "auto":
        path = Path(m).expanduser()
        if not path.is_file():
            raise ClusterFileError(f"HAP_CPU_PROFILE={m}: no such file; use 'auto', 'shipped' or a profile JSON path")
        return load_device(str(path)), False
    path = cache_path()
    if path.is_file():
        try:
            return DeviceProfile.from_json(json.loads(path.read_text()), str(path)), False
        except (json.JSONDecodeError, ClusterFileError):
            pass  # a damaged cache is measured again
    return None, True


def resolve(cluster: Cluster, progress: Callable[[str], None] | None = None) -> Cluster:
    """``cluster`` with each device that stands for this machine (``Cluster.this_machine``, the
    file's ``device = "cpu"``) given the profile ``HAP_CPU_PROFILE`` chooses: the shipped one, a
    profile file, or the cached measurement of this machine, measured now (and cached, see
    ``cache_path``) where there is none. The planner calls this where the cost of "cpu" is
    first needed; parsing a cluster file never does."""
    if not cluster.this_machine:
        return cluster
    profile, pending = _profile_now()
    if pending:
        if progress is not None:
            progress('measuring this machine for device "cpu" (first use, ~20 s)')
        path = cache_path()
        profile = DeviceProfile.from_json(calibrate(path), str(path))
    devices = dict(cluster.devices)
    if profile is not None:
        devices.update(dict.fromkeys(cluster.this_machine, profile))
    resolved = dataclasses.replace(cluster, devices=devices, this_machine=())
    resolved.lint()
    return resolved


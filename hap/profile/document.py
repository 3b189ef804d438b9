"""The profile JSON: the environment it was measured in, the numbers with their samples
and provenance, writing it, and a one-screen summary."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import socket
import statistics
from pathlib import Path
from typing import Any

import torch

from hap.machine import cpu_model

from .fit import fit_collectives
from .harness import CPU_MEMORY_BUDGET, FORMAT, UNEVEN, Measurement, Settings, _sig

# ---------------------------------------------------------------------------------------
# the profile JSON
# ---------------------------------------------------------------------------------------


def environment(device: torch.device, nproc: int) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "processes": nproc,
        "threads_per_process": torch.get_num_threads(),
        "device": str(device),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, driver=_nvidia_driver())
    return env


def _nvidia_driver() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, IndexError, ValueError):
        return "unknown"


MARKETED_GB = (8, 12, 16, 24, 32, 40, 48, 64, 80, 94, 96, 128, 141, 144, 192, 288)


def device_name(device: torch.device) -> str:
    """The profile name a device gets: its model and the memory it is sold with, as the shipped
    profiles are named ("V100-16GB" for a "Tesla V100-SXM2-16GB", "L4-24GB" for an "NVIDIA L4",
    which reports ~22 GiB): a measured profile then replaces the shipped one of its kind."""
    if device.type != "cuda":
        return "cpu"
    p = torch.cuda.get_device_properties(device)
    return gpu_profile_name(p.name, p.total_memory)


def gpu_profile_name(name: str, total_memory: int) -> str:
    model = name.replace("NVIDIA ", "").replace("Tesla ", "").split()[0].split("-")[0]
    labelled = re.search(r"(\d+)\s*GB", name)
    gib = total_memory / 2**30
    gb = int(labelled.group(1)) if labelled else next((m for m in MARKETED_GB if m >= gib - 0.5), round(gib))
    return f"{model}-{gb}GB"


def _slowest(per_rank: list[list[Measurement]]) -> list[Measurement]:
    """Per measurement, the rank with the lowest rate (largest median time)."""
    return [max(ms, key=lambda m: m.used_s / m.work) for ms in zip(*per_rank)]


def _stat(m: Measurement) -> str:
    n = len(m.samples_s)
    which = {"p25": "lower quartile", "min": "fastest"}.get(m.statistic, "median")
    return f"{which} of {n} samples (median {m.median_s:.3g} s), spread {m.spread:.1%}"


def _flop_rates(per_rank: list[dict[str, Any]], tag: str, prov: dict[str, str],
                detail: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per op class and dtype, the slowest rank's median FLOP rate over the sizes measured."""
    flop: dict[str, dict[str, float]] = {}
    for cls in ("matmul", "conv", "attention"):
        for dt in per_rank[0][cls]:
            ms = _slowest([r[cls][dt] for r in per_rank])
            rate = statistics.median(m.value for m in ms)
            flop.setdefault(cls, {})[dt] = _sig(rate)
            sizes = "; ".join(f"{'x'.join(map(str, m.extra['size']))}: {m.value / 1e9:.3g} GFLOP/s ({_stat(m)})"
                              for m in ms)
            prov[f"flop_per_s.{cls}.{dt}"] = (f"measured: {cls} {dt} forward + backward, 3 x forward flops / s, "
                                              f"median over sizes [{sizes}], {ms[0].extra['clock']}, {tag}")
            detail[f"{cls}.{dt}"] = [m.to_json() for m in ms]
    return flop


def _intra_node_link(per_rank: list[dict[str, Any]], device: torch.device, settings: Settings, tag: str,
                     prov: dict[str, str], detail: dict[str, Any]) -> dict[str, Any]:
    """The intra-node link fitted from the collectives measured (an assumed one with one process)."""
    nproc = len(per_rank)
    if not per_rank[0]["collectives"]:
        prov["intra_node.bytes_per_s"] = ("assumed: not measured (one process); run hap-profile under torchrun "
                                          "with 2 or more processes to measure the links")
        prov["intra_node.alpha_s"] = prov["intra_node.bytes_per_s"]
        return {"kind": "assumed", "bytes_per_s": 1e10 if device.type == "cuda" else 4e8,
                "alpha_s": 2e-5 if device.type == "cuda" else 1e-3}
    samples = _slowest([r["collectives"] for r in per_rank])
    per_kind, alpha, bw, per_formula = fit_collectives(samples)
    kind = "nvlink-or-pcie (measured)" if device.type == "cuda" else "loopback"
    fits = "; ".join(f"{k}: {v['alpha_s'] * 1e6:.0f} us + bytes / {(v['bytes_per_s'] or 0) / 1e9:.3g} GB/s"
                     for k, v in per_kind.items())
    what = (f"hap.runtime all_reduce / all_gather / reduce_scatter / all_to_all over {nproc} processes, "
            f"{min(settings.coll_bytes)}-{max(settings.coll_bytes)} bytes, even and uneven {UNEVEN}:1 "
            "splits, padded and grouped, median of per-call wall times; joint relative least "
            f"squares in hap.machine.collective_s's formulas (per collective: {fits})")
    prov["intra_node.bytes_per_s"] = f"measured: {what}, {tag}"
    prov["intra_node.alpha_s"] = prov["intra_node.bytes_per_s"]
    prov["intra_node.collectives"] = ("measured: the same samples, fitted per collective and form in "
                                      f"hap.machine.collective_s's formulas, {tag}")
    detail["collectives"] = per_kind
    detail["collective_samples"] = [m.to_json() for m in samples]
    return {"kind": kind, "bytes_per_s": _sig(bw), "alpha_s": _sig(alpha),
            "collectives": {k: {"alpha_s": a, "bytes_per_s": b} for k, (a, b) in per_formula.items()}}


def build_profile(per_rank: list[dict[str, Any]], device: torch.device, settings: Settings) -> dict[str, Any]:
    """The device profile (``profiles/devices/*.json`` format: every number has a provenance
    line) and, under ``"detail"``, every sample behind it (written beside the profile)."""
    nproc = len(per_rank)
    env = environment(device, nproc)
    who = (env.get("gpu") or env["cpu_model"]) + f" ({env['cpu_count']} cores)" * (device.type == "cpu")
    tag = (f"{env['date'][:10]}, {who}, host {env['host']}, torch {env['torch']}, "
           f"{nproc} concurrent {'single-thread ' if device.type == 'cpu' else ''}process(es), slowest")
    prov: dict[str, str] = {}
    detail: dict[str, Any] = {}
    flop = _flop_rates(per_rank, tag, prov, detail)
    mem = {k: _slowest([[r["memory"][k]] for r in per_rank])[0] for k in per_rank[0]["memory"]}
    floors = {k: _slowest([[r["floor"][k]] for r in per_rank])[0] for k in per_rank[0]["floor"]}
    for k, m in {**mem, **{f"floor.{k}": m for k, m in floors.items()}}.items():
        detail[k] = m.to_json()
    if device.type == "cuda":
        memory_bytes = int(env["gpu_memory_bytes"])
        prov["memory_bytes"] = f"measured: torch.cuda.get_device_properties().total_memory, {tag}"
    else:
        memory_bytes = CPU_MEMORY_BUDGET
        prov["memory_bytes"] = "budget: 8 GiB per rank chosen for the emulated cluster, not measured"
    for k, m in mem.items():
        prov[f"memory_bytes_per_s_by_class.{k}"] = f"measured: {m.what}, bytes / s, {_stat(m)}, {tag}"
    prov["memory_bytes_per_s"] = prov["memory_bytes_per_s_by_class.pointwise"]
    fa, fb = floors["autograd"], floors["bare"]
    prov["kernel_floor_s"] = (f"measured: {fa.what} ({_stat(fa)}): what an emitted train.py pays per op; "
                              f"a bare op without autograd costs {fb.value:.3g} s, {tag}")
    link = _intra_node_link(per_rank, device, settings, tag, prov, detail)
    prov["environment"] = "; ".join(f"{k}={v}" for k, v in env.items())
    prov["settings"] = (f"hap-profile{' --quick' if settings.quick else ''}, {settings.repeats} repeats, "
                        f"samples of >= {settings.min_sample_s} s; "
                        "every sample in samples/<this file's name> beside it")
    if device.type == "cpu":
        prov["overlap_comm"] = ("measured: not overlapped. With as many ranks as cores, gloo's all-reduce threads "
                                "compete with the ranks' compute; bucketed all-reduce during backward measured no "
                                "faster than after it (1024-wide MLP, 2 ranks on 2 cores, 2026-11-22)")
    return {
        "name": device_name(device),
        **({"overlap_comm": False} if device.type == "cpu" else {}),
        "memory_bytes": memory_bytes,
        "flop_per_s": flop,
        "memory_bytes_per_s": _sig(mem["pointwise"].value),
        "memory_bytes_per_s_by_class": {k: _sig(m.value) for k, m in mem.items()},
        "kernel_floor_s": _sig(floors["autograd"].value),
        "intra_node": link,
        "provenance": prov,
        "detail": {"format": FORMAT, "environment": env,
                   "settings": {"quick": settings.quick, "repeats": settings.repeats,
                                "min_sample_s": settings.min_sample_s},
                   "measurements": detail},
    }


def write(profile: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write the profile to ``out`` and its samples to ``samples/<name>`` beside it (out of the way of
    ``profiles/devices/*.json``, which are all device profiles)."""
    profile = dict(profile)
    detail = profile.pop("detail", {})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=2) + "\n")
    side = out.parent / "samples" / out.name
    side.parent.mkdir(exist_ok=True)
    side.write_text(json.dumps(detail, indent=1) + "\n")
    return out, side

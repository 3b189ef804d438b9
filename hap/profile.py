"""``hap-profile``: measure this machine's device (and its links) as a device profile.

    hap-profile [--out FILE] [--quick] [--repeats N] [--nproc N]
    torchrun --nproc-per-node N -m hap.profile [--out FILE]     # (or: torchrun ... $(which hap-profile))

Measures what a `torchrun` rank of an emitted ``train.py`` achieves on this machine:

- CUDA when present (one process per GPU, timed with ``torch.cuda.Event`` after a
  ``synchronize``), else the CPU as torchrun runs it: one single-threaded process per rank
  (OMP_NUM_THREADS=1), ``--nproc`` of them (default 2) measuring *at the same time* so they
  share memory bandwidth and caches as in a real run; rates are per process, the slowest;
- achieved rates in training: matmul (a linear layer's forward and its two backward
  products), convolution and attention (forward + backward through autograd) in fp32, bf16
  and fp16 where the device supports them, several sizes each — reported as
  3 x forward FLOPs / (forward + backward) seconds, the cost model's "backward = 2 x forward";
- memory bandwidth of pointwise ops, reductions and copies; the per-kernel floor (a tiny op
  and its backward node through autograd, per kernel);
- with 2 or more processes: α-β of every collective the plans use, through ``hap.runtime``
  (all-reduce, all-gather, reduce-scatter, all-to-all; even, and uneven 3:1 splits in the
  padded and grouped forms), each fitted by least squares, and the link (α, bytes/s) fitted
  jointly to all of them in the cost model's own formulas (``hap.machine.collective_s``).

Every number is the median of ``--repeats`` samples; the JSON keeps the samples, the median
and the spread ((max - min) / median) of every measurement, and the environment: torch,
CUDA driver / GPU or CPU model, host, date. See docs/profiling.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hap.machine import cpu_model

CPU_MEMORY_BUDGET = 8 * 2**30  # what an emulated CPU rank may use: a budget, not a measurement
UNEVEN = 3  # uneven collectives split the tensor 3:1:1:... over the ranks
FORMAT = "hap-device-profile/1"


# ---------------------------------------------------------------------------------------
# settings: sizes per backend and mode
# ---------------------------------------------------------------------------------------
@dataclass
class Settings:
    quick: bool
    repeats: int
    min_sample_s: float
    matmul: list[int]
    matmul_low: list[int]  # bf16 / fp16 sizes
    conv: list[tuple[int, int, int]]  # (batch, channels, height=width), 3x3 filters, same channels
    attention: list[tuple[int, int, int, int]]  # (batch, heads, sequence, head dim)
    stream_elems: int
    coll_bytes: list[int]
    cpu_time: bool = False  # True: CPU compute timed in thread CPU time (see Bench.time)
    # seconds of samples per collective case: a CPU all-reduce of 8 MiB scatters 10-40 ms call to
    # call, and the 12 samples of the first calibrations put two runs minutes apart at 0.49 and
    # 0.79 GB/s
    comm_budget_s: float = 0.25

    @classmethod
    def make(cls, cuda: bool, quick: bool, repeats: int | None) -> Settings:
        if cuda:
            if quick:
                return cls(True, repeats or 3, 0.01, [2048], [2048], [(32, 128, 28)], [(8, 16, 1024, 64)],
                           2**24, [2**16, 2**20, 2**24])
            return cls(False, repeats or 9, 0.05, [1024, 2048, 4096, 8192], [2048, 4096, 8192],
                       [(64, 64, 56), (64, 128, 28), (64, 256, 14)], [(8, 16, 1024, 64), (4, 16, 2048, 128)],
                       2**26, [2**12 * 4**i for i in range(8)])
        if quick:
            # also the on-first-use calibration of device "cpu" (hap.calibrate): collectives up to
            # 8 MiB, the gradient all-reduce of a few-million-parameter model
            return cls(True, repeats or 3, 0.002, [256, 1024], [64], [(2, 16, 16)], [(1, 2, 64, 32)],
                       2**24, [2**12, 2**16, 2**20, 2**23])  # 64 MiB streams: out of cache, as in a step
        return cls(False, repeats or 7, 0.04, [256, 512, 1024], [256, 512], [(8, 64, 32), (16, 32, 56)],
                   [(4, 8, 256, 64), (2, 8, 512, 64)], 2**24, [2**10 * 4**i for i in range(8)])


# ---------------------------------------------------------------------------------------
# timing: the only backend-specific code
# ---------------------------------------------------------------------------------------
class Clock:
    """Seconds per call of ``fn``: CPU wall time, or CUDA events around a loop of calls."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def loop_s(self, fn: Callable[[], Any], loops: int, cpu_time: bool = False) -> float:
        """Seconds per call over ``loops`` calls; ``cpu_time`` (CPU only): this thread's CPU time,
        which other processes on a busy machine do not inflate (single-threaded compute only)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            for _ in range(loops):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / loops
        clock = time.thread_time if cpu_time else time.perf_counter
        t0 = clock()
        for _ in range(loops):
            fn()
        return (clock() - t0) / loops


@dataclass
class Measurement:
    what: str
    unit: str  # of `value`: "flop/s", "bytes/s", "s"
    samples_s: list[float]  # seconds per call, one per repeat
    work: float  # flops or bytes per call (1 for latencies)
    extra: dict[str, Any] = field(default_factory=dict)
    statistic: str = "median"  # what `value` uses: "median", "min" (CPU compute), "p25" (collectives)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def used_s(self) -> float:
        if self.statistic == "p25" and len(self.samples_s) >= 4:
            return statistics.quantiles(self.samples_s, n=4)[0]
        if self.statistic == "min":
            return min(self.samples_s)
        return self.median_s

    @property
    def value(self) -> float:
        # rates: work per second; latencies ("s"): seconds per unit of work (work = units per call)
        return self.work / self.used_s if self.unit != "s" else self.used_s * self.work

    @property
    def spread(self) -> float:
        return (max(self.samples_s) - min(self.samples_s)) / self.median_s if self.median_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "unit": self.unit, "value": _sig(self.value), "statistic": self.statistic,
                "median_s": self.median_s, "used_s": self.used_s, "min_s": min(self.samples_s),
                "spread": round(self.spread, 4), "samples_s": [float(f"{s:.6g}") for s in self.samples_s],
                "work": self.work, **self.extra}


class Bench:
    """Runs measurements in lock-step on every process of the group (if any)."""

    def __init__(self, settings: Settings, device: torch.device, progress: Callable[[str], None]) -> None:
        self.s = settings
        self.device = device
        self.clock = Clock(device)
        self.progress = progress
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.world = self.dist.get_world_size() if self.dist else 1

    def barrier(self) -> None:
        if self.dist:
            self.clock.sync()
            self.dist.barrier()

    def agree_max(self, v: int) -> int:
        if not self.dist:
            return v
        t = torch.tensor([v], dtype=torch.int64, device=self.device if self.clock.cuda else "cpu")
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return int(t.item())

    def time(self, what: str, unit: str, work: float, fn: Callable[[], Any], min_s: float | None = None,
             comm: bool = False, **extra: Any) -> Measurement:
        """Samples of ``fn``: compute in CPU time on CPU (``Settings.cpu_time``), collectives
        (``comm``) and anything on CUDA in elapsed time."""
        min_s = self.s.min_sample_s if min_s is None else min_s
        cpu_time = self.s.cpu_time and not comm and not self.clock.cuda
        fn()  # warm-up (allocations, kernels selection)
        once = max(self.clock.loop_s(fn, 1), 1e-7)
        loops = self.agree_max(max(1, min(int(min_s / once), 100000)))  # collectives must match
        repeats = self.s.repeats
        if comm:  # one call per sample, many samples
            loops, repeats = 1, self.agree_max(max(4 * self.s.repeats, min(int(self.s.comm_budget_s / once), 200)))
        samples = []
        for _ in range(repeats):
            self.barrier()  # every process measures at the same time
            samples.append(self.clock.loop_s(fn, loops, cpu_time))
        self.progress(what)
        clock = "thread CPU time" if cpu_time else ("CUDA events" if self.clock.cuda else "wall time")
        # what is used: the median sample, in wall time, collectives one call per sample: what a
        # training step on this machine sees, its usual disturbances included (the spread is kept
        # beside it). The fastest sample or the lower quartile predicted emulated steps ~2x too fast.
        stat = "median"
        return Measurement(what, unit, samples, work, {"loops": loops, "clock": clock, **extra}, stat)


# ---------------------------------------------------------------------------------------
# compute measurements
# ---------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _supported(dtype: str, device: torch.device) -> bool:
    if dtype == "fp32":
        return True
    try:
        a = torch.ones(8, 8, dtype=DTYPES[dtype], device=device)
        (a @ a).sum().item()
        if device.type == "cuda" and dtype == "bf16":
            return torch.cuda.is_bf16_supported()
        return True
    except (RuntimeError, TypeError):
        return False


def _train(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    """One forward + backward of ``fn`` (gradients of ``leaves`` discarded)."""
    def step() -> None:
        out = fn()
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        del grads
    return step


def matmul_measurements(b: Bench, dtype: str) -> list[Measurement]:
    dev, dt = b.device, DTYPES[dtype]
    out = []
    for n in (b.s.matmul if dtype == "fp32" else b.s.matmul_low):
        x = torch.randn(n, n, dtype=dt, device=dev, requires_grad=True)
        w = torch.randn(n, n, dtype=dt, device=dev, requires_grad=True)
        flop = 2 * n**3
        out.append(b.time(f"matmul {dtype} {n}x{n}x{n}, linear forward + backward", "flop/s", 3 * flop,
                          _train(lambda x=x, w=w: F.linear(x, w), [x, w]), size=[n, n, n], dtype=dtype))
    return out


def conv_measurements(b: Bench, dtype: str) -> list[Measurement]:
    dev, dt = b.device, DTYPES[dtype]
    out = []
    for bs, c, hw in b.s.conv:
        x = torch.randn(bs, c, hw, hw, dtype=dt, device=dev, requires_grad=True)
        w = torch.randn(c, c, 3, 3, dtype=dt, device=dev, requires_grad=True)
        flop = 2 * bs * c * hw * hw * c * 9  # padding=1 keeps hw
        out.append(b.time(f"conv2d {dtype} {bs}x{c}x{hw}x{hw}, {c} filters 3x3, forward + backward", "flop/s",
                          3 * flop, _train(lambda x=x, w=w: F.conv2d(x, w, padding=1), [x, w]),
                          size=[bs, c, hw, hw], dtype=dtype))
    return out


def attention_measurements(b: Bench, dtype: str) -> list[Measurement]:
    dev, dt = b.device, DTYPES[dtype]
    out = []
    for bs, h, seq, d in b.s.attention:
        q, k, v = (torch.randn(bs, h, seq, d, dtype=dt, device=dev, requires_grad=True) for _ in range(3))
        flop = 4 * bs * h * seq * seq * d  # QK^T and (softmax)V
        out.append(b.time(f"scaled_dot_product_attention {dtype} {bs}x{h}x{seq}x{d}, forward + backward",
                          "flop/s", 3 * flop,
                          _train(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), [q, k, v]),
                          size=[bs, h, seq, d], dtype=dtype))
    return out


def memory_measurements(b: Bench) -> dict[str, Measurement]:
    n, dev = b.s.stream_elems, b.device
    x, y, z = torch.randn(n, device=dev), torch.randn(n, device=dev), torch.empty(n, device=dev)
    s = torch.empty((), device=dev)
    mib = n * 4 / 2**20
    return {
        "pointwise": b.time(f"torch.add fp32 {mib:.0f} MiB tensors (read 2, write 1)", "bytes/s", 3 * 4 * n,
                            lambda: torch.add(x, y, out=z)),
        "reduction": b.time(f"torch.sum fp32 {mib:.0f} MiB tensor (read 1)", "bytes/s", 4 * n,
                            lambda: torch.sum(x, dim=0, out=s)),
        "copy": b.time(f"Tensor.copy_ fp32 {mib:.0f} MiB (read 1, write 1)", "bytes/s", 2 * 4 * n,
                       lambda: z.copy_(x)),
    }


def floor_measurements(b: Bench) -> dict[str, Measurement]:
    dev = b.device
    a, c = torch.ones(1, device=dev), torch.ones(1, device=dev)
    chain = 16
    leaf = torch.ones(1, device=dev, requires_grad=True)

    def autograd_chain() -> None:
        y = leaf
        for _ in range(chain):
            y = y * 1.0001
        (g,) = torch.autograd.grad(y, [leaf], torch.ones_like(y))
        del g

    return {
        "bare": b.time("torch.add on 1-element tensors (no autograd), per call", "s", 1.0,
                       lambda: torch.add(a, c), min_s=b.s.min_sample_s / 2),
        # 16 forward kernels + 16 backward nodes (+ the grad call): per kernel
        "autograd": b.time(f"chain of {chain} tiny multiplies through autograd, forward + backward, per kernel",
                           "s", 1.0 / (2 * chain), autograd_chain, min_s=b.s.min_sample_s / 2),
    }


# ---------------------------------------------------------------------------------------
# collectives through hap.runtime
# ---------------------------------------------------------------------------------------
def _split(total: int, n: int, uneven: bool) -> tuple[int, ...]:
    from hap.placement import largest_remainder

    return largest_remainder(total, [UNEVEN if (uneven and r == 0) else 1 for r in range(n)])


def collective_measurements(b: Bench) -> list[Measurement]:
    import hap.runtime as hr

    n, rank, dev = b.world, b.dist.get_rank(), b.device
    cols = 256  # rows x 256 fp32: rows = bytes / 1 KiB
    out = []
    for nbytes in b.s.coll_bytes:
        rows = max(n * UNEVEN + n, nbytes // (4 * cols))
        full = torch.randn(rows, cols, device=dev)
        nb = full.numel() * 4
        cases: list[tuple[str, str, tuple[int, ...], Callable[[], Any], tuple[int, ...] | None]] = []
        cases.append(("all_reduce", "", (), lambda full=full: hr.all_reduce(full), None))
        for uneven in (False, True):
            ls = _split(rows, n, uneven)
            cs = _split(cols, n, not uneven)  # all-to-all destination split: differs from the source
            mine = torch.randn(ls[rank], cols, device=dev)
            for form in (("padded",) if not uneven else ("padded", "grouped")):
                cases.append(("all_gather", form, ls,
                              lambda mine=mine, ls=ls, form=form: hr.all_gather(mine, 0, ls, form=form), None))
                cases.append(("reduce_scatter", form, ls,
                              lambda full=full, ls=ls, form=form: hr.reduce_scatter(full, 0, ls, form=form), None))
                cases.append(("all_to_all", form, ls,
                              lambda mine=mine, ls=ls, cs=cs, form=form: hr.all_to_all(mine, 0, ls, 1, cs, form=form),
                              cs))
        with torch.no_grad():
            for kind, form, ls, fn, dst in cases:
                shape = "even" if len(set(ls)) <= 1 else "uneven"
                label = f"{kind} {form + ' ' if form else ''}{shape if ls else ''} {nb} bytes".replace("  ", " ")
                out.append(b.time(f"gloo/nccl {label}", "s", 1.0, fn, min_s=b.s.min_sample_s / 2, comm=True,
                                  collective=kind, form=form or "", bytes=nb, lengths=list(ls),
                                  dst_lengths=list(dst) if dst else None, ranks=n))
    return out


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """t = a + b x minimising relative error; a >= 0."""
    w = [1.0 / (y * y) for y in ys]
    sw, sx, sy = sum(w), sum(wi * x for wi, x in zip(w, xs)), sum(wi * y for wi, y in zip(w, ys))
    sxx, sxy = sum(wi * x * x for wi, x in zip(w, xs)), sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    det = sw * sxx - sx * sx
    if det <= 0:
        return min(ys), 0.0
    a, b = (sxx * sy - sx * sxy) / det, (sw * sxy - sx * sy) / det
    if a < 0:  # through the origin
        a, b = 0.0, sxy / sxx
    return a, max(b, 0.0)


def fit_collectives(ms: list[Measurement]) -> tuple[dict[str, Any], float, float, dict[str, tuple[float, float]]]:
    """Per collective (kind, form, even/uneven): α + bytes·β; the link (α, bytes/s) in
    ``hap.machine.collective_s``'s terms, fitted to all points jointly (relative least squares); and
    that pair fitted per collective and form (what the cost model uses where the profile has it)."""
    from hap.machine import Link, collective_s

    groups: dict[str, list[Measurement]] = {}
    for m in ms:
        shape = "even" if len(set(m.extra["lengths"])) <= 1 else "uneven"
        key = m.extra["collective"] + (f".{m.extra['form']}.{shape}" if m.extra["lengths"] else "")
        groups.setdefault(key, []).append(m)
    per = {}
    per_formula: dict[str, tuple[float, float]] = {}
    rows = []
    for key, g in groups.items():
        xs, ys = [m.extra["bytes"] for m in g], [m.used_s for m in g]
        a, slope = _fit_line(xs, ys)
        per[key] = {"alpha_s": _sig(a), "bytes_per_s": _sig(1 / slope) if slope > 0 else None,
                    "points": [[x, float(f"{y:.6g}")] for x, y in zip(xs, ys)]}
        for m in g:
            n, ls = m.extra["ranks"], m.extra["lengths"]
            fr = tuple(x / sum(ls) for x in ls) if ls else (1 / n,) * n
            fd = m.extra.get("dst_lengths")
            fd = tuple(x / sum(fd) for x in fd) if fd else None
            form = m.extra["form"]
            ca = collective_s(m.extra["collective"], m.extra["bytes"], fr, Link(1.0, 1e300), form, fd)
            cb = collective_s(m.extra["collective"], m.extra["bytes"], fr, Link(0.0, 1.0), form, fd)
            rows.append((ca, cb, m.used_s, m.extra["collective"] + (f".{form}" if form else "")))
    alpha, bw = _fit_formula([(ca, cb, t) for ca, cb, t, _ in rows])
    for key in sorted({k for *_, k in rows}):  # the formula's (α, bytes/s) per collective and form
        a, b = _fit_formula([(ca, cb, t) for ca, cb, t, k in rows if k == key])
        per_formula[key] = (_sig(a), _sig(b))
    return per, alpha, bw, per_formula


def _fit_formula(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(α, bytes/s) with t = ca·α + cb/bw through the smallest and the largest transfers: the
    quarter of the rows with the smallest bandwidth term ``cb`` fixes α, the quarter with the
    largest fixes the bandwidth. Mid-size CPU collectives are erratic (a 1 MiB gloo all-reduce's
    quartiles were 1.3 and 4.9 ms in one run), and a relative least-squares fit through them put
    one calibration's 8.8 MB gradient all-reduce at 31 ms where the training step took ~18."""
    rows = sorted(rows, key=lambda r: r[1])
    k = max(1, len(rows) // 4)
    lo = [sum(col) for col in zip(*rows[:k])]
    hi = [sum(col) for col in zip(*rows[-k:])]
    det = lo[0] * hi[1] - lo[1] * hi[0]
    alpha, inv_bw = ((lo[2] * hi[1] - lo[1] * hi[2]) / det, (lo[0] * hi[2] - lo[2] * hi[0]) / det) \
        if abs(det) > 1e-300 else (0.0, 0.0)
    if alpha < 0:  # through the origin, from the large transfers
        alpha, inv_bw = 0.0, hi[2] / hi[1]
    if inv_bw <= 0:  # latency-bound throughout
        alpha, inv_bw = hi[2] / hi[0], 1e-12
    return alpha, 1 / inv_bw


# ---------------------------------------------------------------------------------------
# one process: measure everything, in the same order on every rank
# ---------------------------------------------------------------------------------------
def _plan_tasks(b: Bench, dtypes: list[str]) -> int:
    s = b.s
    n = len(s.matmul) + (len(dtypes) - 1) * len(s.matmul_low)
    conv_dtypes = dtypes if b.clock.cuda else ["fp32"]
    n += len(conv_dtypes) * (len(s.conv) + len(s.attention)) + 3 + 2
    if b.world > 1:
        n += len(s.coll_bytes) * 10
    return n


def measure(settings: Settings, device: torch.device, progress: Callable[[str], None] | None = None,
            on_total: Callable[[int], None] | None = None) -> dict[str, Any]:
    """This process's measurements (call on every rank of the group at once)."""
    b = Bench(settings, device, progress or (lambda what: None))
    dtypes = [d for d in DTYPES if _supported(d, device)]
    if on_total:
        on_total(_plan_tasks(b, dtypes))
    res: dict[str, Any] = {"matmul": {}, "conv": {}, "attention": {}}
    for dt in dtypes:
        res["matmul"][dt] = matmul_measurements(b, dt)
    # CPU builds run bf16/fp16 convolution and attention through slow reference kernels; the
    # emulated CPU cluster trains fp32, so only fp32 is measured there
    for dt in (dtypes if b.clock.cuda else ["fp32"]):
        res["conv"][dt] = conv_measurements(b, dt)
        res["attention"][dt] = attention_measurements(b, dt)
    res["memory"] = memory_measurements(b)
    res["floor"] = floor_measurements(b)
    res["collectives"] = collective_measurements(b) if b.world > 1 else []
    return res


# ---------------------------------------------------------------------------------------
# the profile JSON
# ---------------------------------------------------------------------------------------
def _sig(x: float) -> float:
    return float(f"{x:.4g}")


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


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    p = torch.cuda.get_device_properties(device)
    short = p.name.replace("NVIDIA ", "").replace("Tesla ", "").split()[0]
    return f"{short}-{round(p.total_memory / 2**30)}GB"


def _slowest(per_rank: list[list[Measurement]]) -> list[Measurement]:
    """Per measurement, the rank with the lowest rate (largest median time)."""
    return [max(ms, key=lambda m: m.used_s / m.work) for ms in zip(*per_rank)]


def _stat(m: Measurement) -> str:
    n = len(m.samples_s)
    which = {"p25": "lower quartile", "min": "fastest"}.get(m.statistic, "median")
    return f"{which} of {n} samples (median {m.median_s:.3g} s), spread {m.spread:.1%}"


def build_profile(per_rank: list[dict[str, Any]], device: torch.device, settings: Settings) -> dict[str, Any]:
    """The device profile (``profiles/devices/*.json`` format: every number has a provenance
    line) and, under ``"detail"``, every sample behind it (written beside the profile)."""
    nproc = len(per_rank)
    env = environment(device, nproc)
    who = (env.get("gpu") or env["cpu_model"]) + f" ({env['cpu_count']} cores)" * (device.type == "cpu")
    tag = (f"{env['date'][:10]}, {who}, host {env['host']}, torch {env['torch']}, "
           f"{nproc} concurrent {'single-thread ' if device.type == 'cpu' else ''}process(es), slowest")
    flop: dict[str, dict[str, float]] = {}
    prov: dict[str, str] = {}
    detail: dict[str, Any] = {}
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
    colls = per_rank[0]["collectives"]
    if colls:
        per_kind, alpha, bw, per_formula = fit_collectives(_slowest([r["collectives"] for r in per_rank]))
        kind = "nvlink-or-pcie (measured)" if device.type == "cuda" else "loopback"
        link = {"kind": kind, "bytes_per_s": _sig(bw), "alpha_s": _sig(alpha),
                "collectives": {k: {"alpha_s": a, "bytes_per_s": b} for k, (a, b) in per_formula.items()}}
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
        detail["collective_samples"] = [m.to_json() for m in _slowest([r["collectives"] for r in per_rank])]
    else:
        link = {"kind": "assumed", "bytes_per_s": 1e10 if device.type == "cuda" else 4e8,
                "alpha_s": 2e-5 if device.type == "cuda" else 1e-3}
        prov["intra_node.bytes_per_s"] = ("assumed: not measured (one process); run hap-profile under torchrun "
                                          "with 2 or more processes to measure the links")
        prov["intra_node.alpha_s"] = prov["intra_node.bytes_per_s"]
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


# ---------------------------------------------------------------------------------------
# processes: torchrun, spawned CPU workers, or one process
# ---------------------------------------------------------------------------------------
class _Progress:
    """A rich progress bar on rank 0 (silent elsewhere or when ``quiet``)."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        self.task = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]hap-profile[/]"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.description}"), transient=False)

    def total(self, n: int) -> None:
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("starting", total=n)

    def step(self, what: str) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, description=what[:60])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _worker(rank: int, world: int, port: int, quick: bool, repeats: int | None, show: bool,
            result: Any) -> None:
    """Measure on one rank of a group of ``world`` (spawned, or under torchrun when port is 0)."""
    import torch.distributed as dist

    if world > 1 and port:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    device = _device()
    if device.type == "cpu":
        torch.set_num_threads(1)
    if world > 1:
        import hap.runtime as hr

        hr.init()
    settings = Settings.make(device.type == "cuda", quick, repeats)
    torch.manual_seed(rank)
    bar = _Progress(show and rank == 0)
    try:
        res = measure(settings, device, bar.step, bar.total)
    finally:
        bar.close()
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, res)
        import hap.runtime as hr

        hr.shutdown()
    else:
        gathered = [res]
    if rank == 0:
        profile = build_profile(gathered, device, settings)
        if callable(result):
            result(profile)
        else:
            Path(result).write_text(json.dumps(profile) + "\n")


def run(quick: bool = False, repeats: int | None = None, nproc: int | None = None, show: bool = True,
        port: int = 29517) -> dict[str, Any]:
    """Measure and return the profile dict (spawning ``nproc`` CPU processes when not under torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    box: list[dict[str, Any]] = []
    if world > 1:  # under torchrun: every rank measures, rank 0 returns the profile
        _worker(int(os.environ.get("RANK", "0")), world, 0, quick, repeats, show, box.append)
        return box[0] if box else {}
    if nproc is None:
        nproc = 1 if torch.cuda.is_available() else 2
    if nproc <= 1:
        _worker(0, 1, 0, quick, repeats, show, box.append)
        return box[0]
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        mp.spawn(_worker, args=(nproc, port, quick, repeats, show, str(out)), nprocs=nproc, join=True)
        return json.loads(out.read_text())


def summary(profile: dict[str, Any]) -> str:
    lines = [f"device {profile['name']}: memory {profile['memory_bytes'] / 2**30:.1f} GiB"]
    for cls, rates in profile["flop_per_s"].items():
        lines.append(f"  {cls:9s} " + "  ".join(f"{dt} {v / 1e9:8.1f} GFLOP/s" for dt, v in rates.items()))
    by = profile.get("memory_bytes_per_s_by_class", {})
    lines.append("  memory    " + "  ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in by.items()))
    lines.append(f"  floor     {profile['kernel_floor_s'] * 1e6:.2f} us per kernel (autograd)")
    link = profile["intra_node"]
    lines.append(f"  link      {link['kind']}: alpha {link['alpha_s'] * 1e6:.1f} us, "
                 f"{link['bytes_per_s'] / 1e9:.3f} GB/s")
    for key, f in profile.get("detail", {}).get("measurements", {}).get("collectives", {}).items():
        bw = f"{f['bytes_per_s'] / 1e9:.3f} GB/s" if f["bytes_per_s"] else "-"
        lines.append(f"    {key:28s} alpha {f['alpha_s'] * 1e6:8.1f} us  {bw}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hap-profile", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="profile JSON to write (default: ./hap-profile-<device>.json; to recalibrate the "
                         "shipped CPU profile: --out profiles/devices/cpu.json)")
    ap.add_argument("--quick", action="store_true", help="few small sizes and 3 repeats (seconds, not minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="samples per measurement (default 7 CPU, 9 CUDA)")
    ap.add_argument("--nproc", type=int, default=None,
                    help="CPU: concurrent single-thread processes to measure with (default 2; ignored under "
                         "torchrun, which sets the group)")
    ap.add_argument("--port", type=int, default=29517, help="rendezvous port of the spawned CPU processes")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        print("hap-profile: --repeats must be at least 1", file=sys.stderr)
        return 2
    try:
        profile = run(quick=args.quick, repeats=args.repeats, nproc=args.nproc, port=args.port)
    except KeyboardInterrupt:
        print("hap-profile: interrupted", file=sys.stderr)
        return 130
    if not profile:  # a rank other than 0 under torchrun
        return 0
    out, side = write(profile, Path(args.out or f"hap-profile-{profile['name']}.json"))
    print(summary(profile))
    print(f"wrote {out} (samples: {side})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The timing harness: sizes per backend and mode (``Settings``), the clock (the only
backend-specific code), a measurement with its samples, and the bench that runs them."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

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
            return cls(True, repeats or 3, 0.002, [256, 1024], [256], [(2, 16, 16)], [(1, 2, 64, 32)],
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


def _sig(x: float) -> float:
    return float(f"{x:.4g}")

"""Measure this machine as a `cpu` device profile and write profiles/devices/cpu.json.

    python profiles/measure_cpu.py [--out profiles/devices/cpu.json] [--repeats 7]

Runs what a 2-rank `torchrun` job with OMP_NUM_THREADS=1 sees: two processes, one thread
each, measuring *at the same time* (so memory bandwidth and caches are shared as in a real
run). Rates are per process. Collectives: gloo all_reduce over the loopback between the two
processes, 1 KiB .. 16 MiB, fitted as t = alpha + bytes / bytes_per_s by least squares.
For a 2-rank ring all-reduce every rank sends and receives exactly `bytes`, so the fitted
bandwidth is the bus bandwidth of the link.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

MEMORY_BYTES = 8 * 2**30  # what a rank may use: a budget, not a measurement


def _time(fn, repeats: int, min_s: float = 0.05) -> float:
    """Median seconds per call of fn, each sample looping long enough to exceed min_s."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    loops = torch.tensor([max(1, int(min_s / once))])
    dist.all_reduce(loops, op=dist.ReduceOp.MAX)  # same loop count on both ranks (collectives must match)
    loops = int(loops)
    samples = []
    for _ in range(repeats):
        dist.barrier()  # both ranks measure at the same time
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - t0) / loops)
    return statistics.median(samples)


def _matmul_rate(dtype: torch.dtype, sizes: list[int], repeats: int) -> float:
    rates = []
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        rates.append(2 * n**3 / _time(lambda a=a, b=b: a @ b, repeats))
    return statistics.median(rates)


def _conv_rate(repeats: int) -> float:
    n, c, hw, k = 8, 64, 32, 3
    x, w = torch.randn(n, c, hw, hw), torch.randn(c, c, k, k)
    flop = 2 * n * c * hw * hw * c * k * k  # padding=1 keeps hw
    return flop / _time(lambda: F.conv2d(x, w, padding=1), repeats)


def _attention_rate(repeats: int) -> float:
    b, h, seq, d = 4, 8, 256, 64
    q, k, v = (torch.randn(b, h, seq, d) for _ in range(3))
    flop = 4 * b * h * seq * seq * d  # QK^T and (softmax)V
    return flop / _time(lambda: F.scaled_dot_product_attention(q, k, v), repeats)


def _memory_rate(repeats: int) -> float:
    n = 16 * 2**20  # 64 MiB fp32 per tensor, well past the caches
    a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)
    return 3 * 4 * n / _time(lambda: torch.add(a, b, out=c), repeats)  # read a, b; write c


def _kernel_floor(repeats: int) -> float:
    a, b = torch.ones(1), torch.ones(1)
    return _time(lambda: torch.add(a, b), repeats, min_s=0.02)


def _allreduce_fit(repeats: int) -> tuple[float, float, list[tuple[int, float]]]:
    points = []
    for log2 in range(10, 25, 2):  # 1 KiB .. 16 MiB
        nbytes = 2**log2
        t = torch.zeros(nbytes // 4)
        points.append((nbytes, _time(lambda t=t: dist.all_reduce(t), repeats, min_s=0.02)))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    alpha = my - slope * mx
    if alpha <= 0:  # small-message times are noisy; never report a negative latency
        alpha = min(ys)
    return alpha, 1.0 / slope, points


def _worker(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    r: dict[str, float] = {
        "matmul.fp32": _matmul_rate(torch.float32, [256, 512, 1024], repeats),
        "conv.fp32": _conv_rate(repeats),
        "attention.fp32": _attention_rate(repeats),
        "memory": _memory_rate(repeats),
        "floor": _kernel_floor(repeats),
    }
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        try:
            r[f"matmul.{name}"] = _matmul_rate(dtype, [256, 512], repeats)
        except RuntimeError:  # dtype has no CPU matmul kernel in this build
            pass
    alpha, bw, points = _allreduce_fit(repeats)
    # Per-process rates: the slower of the two ranks (both run concurrently, like torchrun).
    gathered: list[dict | None] = [None] * world
    dist.all_gather_object(gathered, r)
    dist.destroy_process_group()
    if rank == 0:
        merged = {k: min(g[k] for g in gathered if k in g) for k in r}
        _write(merged, alpha, bw, points, repeats, out)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _write(r: dict, alpha: float, bw: float, points: list, repeats: int, out: str) -> None:
    tag = (
        f"{datetime.date.today().isoformat()}, {_cpu_model()} ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, median of {repeats}, 2 concurrent single-thread processes"
    )
    what = {
        "matmul.fp32": "fp32 matmul 256/512/1024 square, median over sizes",
        "matmul.bf16": "bf16 matmul 256/512 square, median over sizes",
        "matmul.fp16": "fp16 matmul 256/512 square, median over sizes",
        "conv.fp32": "conv2d 8x64x32x32, 64 filters 3x3",
        "attention.fp32": "scaled_dot_product_attention 4x8x256x64",
    }
    flop: dict[str, dict[str, float]] = {}
    prov = {}
    for key, desc in what.items():
        if key in r:
            cls, dtype = key.split(".")
            flop.setdefault(cls, {})[dtype] = _sig(r[key])
            prov[f"flop_per_s.{key}"] = f"measured: {desc}, {tag}"
    profile = {
        "name": "cpu",
        "memory_bytes": MEMORY_BYTES,
        "flop_per_s": flop,
        "memory_bytes_per_s": _sig(r["memory"]),
        "kernel_floor_s": _sig(r["floor"]),
        "intra_node": {"kind": "loopback", "bytes_per_s": _sig(bw), "alpha_s": _sig(alpha)},
        "provenance": {
            **prov,
            "memory_bytes": "budget: 8 GiB per rank chosen for the emulated cluster, not measured",
            "memory_bytes_per_s": f"measured: torch.add 64 MiB fp32 tensors, 3 x bytes / s, {tag}",
            "kernel_floor_s": f"measured: torch.add on 1-element tensors, s per call, {tag}",
            "intra_node.bytes_per_s": f"measured: gloo all_reduce 1 KiB-16 MiB, least-squares slope, {tag}; "
            f"points (bytes: s): {', '.join(f'{b}: {t:.3g}' for b, t in points)}",
            "intra_node.alpha_s": f"measured: gloo all_reduce 1 KiB-16 MiB, least-squares intercept, {tag}",
        },
    }
    Path(out).write_text(json.dumps(profile, indent=2) + "\n")
    print(json.dumps({k: v for k, v in profile.items() if k != "provenance"}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "devices" / "cpu.json"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--port", type=int, default=29517)
    args = ap.parse_args()
    mp.spawn(_worker, args=(2, args.port, args.repeats, args.out), nprocs=2, join=True)


if __name__ == "__main__":
    main()

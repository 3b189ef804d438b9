"""Measured compute for the local CPU: time an op node at the exact per-rank shapes.

A roofline (flops / rate + floor) misses how much slower a CPU matmul runs on the thin shapes
a small share gives: one thread of this project's VM does 1024x1024 weights at ~50 GFLOP/s
for 64 rows and ~80 for 192, so proportional shares leave the slower rank the bottleneck.
Where a device profile says ``"measure_ops": true`` (the on-first-use calibration of
``device = "cpu"``, see ``hap.calibrate``) and the planning process runs on that device,
the cost model asks this module for the forward + backward seconds of each op node (views
and creations aside) at the shapes rank ``r`` will run, and scales them by the rank's
``slowdown`` as the emulation does; for a small op that time is mostly its dispatch and
autograd overhead, which a per-kernel floor underestimated 2-3x. Timings are memoised per (op,
arguments, shapes), the op's inputs known by their place rather than their names, so a plan
measures each distinct call once however many blocks repeat it (a few ms each), single-threaded
as torchrun runs ranks.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from hap.graph import Graph, Node, TensorMeta, decode_arg, resolve_target
from hap.moves import move

REPEATS = 9
MAX_CALL_S = 0.5  # an op slower than this (analytic estimate) is not timed: the roofline is used
EVICT_BYTES = 8 * 2**20  # written before every sample: more than a core's private caches
_memo: dict[tuple, float | None] = {}
_scratch: list[torch.Tensor] = []


def _evict() -> None:
    """Push the op's operands out of the core's private caches. In a step, other layers run
    between two calls of an op; timed back to back, a shard small enough for L2 (a 204x1024
    weight is 0.8 MB) stays there and ran ~1.4x faster than it did in the emitted program."""
    if not _scratch:
        _scratch.append(torch.empty(EVICT_BYTES // 4))
    _scratch[0].fill_(1.0)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h) and their defaults
TRIM_DEFAULT, MMAP_MAX_DEFAULT = 128 * 1024, 65536


def _keep_freed_memory(keep: bool) -> None:
    """While ``keep``, glibc serves every allocation from the heap and never gives its top back
    (where there is glibc: elsewhere nothing is done)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    mallopt(M_MMAP_MAX, 0 if keep else MMAP_MAX_DEFAULT)
    mallopt(M_TRIM_THRESHOLD, 2**30 if keep else TRIM_DEFAULT)


def _median_s(step, repeats: int) -> float:
    """Median seconds of ``step()`` over ``repeats`` samples, after one warm-up call (allocation,
    kernel selection), with the core's private caches evicted before each sample.

    While it times, freed memory stays in the process: a call that frees its outputs and
    gradients all at once leaves them at the heap's top (or in their own mappings, when large),
    which glibc gives back to the system, and the next call takes them again page by page. A
    training step never frees that way (its allocations interleave), and with glibc's defaults
    a bf16 conv with 384x16x32x32 outputs timed 34.3 ms fwd + bwd against 11.7 ms without; the
    whole CNN step computed in 105 ms."""
    _keep_freed_memory(True)
    try:
        step()
        samples = []
        for _ in range(repeats):
            _evict()
            t0 = time.perf_counter()
            step()
            samples.append(time.perf_counter() - t0)
    finally:
        _keep_freed_memory(False)
    return statistics.median(samples)


def _key_of(x: Any, place: dict[str, int] | None = None) -> Any:
    """``x`` as a hashable key; with ``place``, a reference to an input node (``{"node": n}``) as
    its place among the op's inputs, so the same op on the same shapes in another block is the
    same key."""
    if place is not None and isinstance(x, dict) and len(x) == 1 and "node" in x:
        return ("input", place[x["node"]])
    if isinstance(x, dict):
        return tuple(sorted((k, _key_of(v, place)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_key_of(v, place) for v in x)
    return x


def time_node(graph: Graph, node: Node, shapes: dict[str, tuple[int, ...]], grad_inputs: set[str],
              backward: bool) -> float | None:
    """Median seconds of ``node``'s forward (+ backward if ``backward``) with its tensor inputs at
    ``shapes`` (input node name -> local shape), or None if it cannot be run standalone."""
    metas: dict[str, TensorMeta] = {}
    for name in node.inputs():
        m = graph[name].meta
        if not isinstance(m, TensorMeta):
            return None
        metas[name] = m
    # an input by its place, not its name: the repeated blocks' ops are timed once
    place = {n: i for i, n in enumerate(metas)}
    key = (node.target, _key_of(node.args, place), _key_of(node.kwargs, place), backward, graph.precision,
           tuple((shapes[n], metas[n].dtype, n in grad_inputs) for n in metas))
    if key in _memo:
        return _memo[key]
    _memo[key] = None
    if any(0 in shapes[n] for n in metas):
        _memo[key] = 0.0
        return 0.0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as torchrun runs each rank (OMP_NUM_THREADS=1)
        g = torch.Generator().manual_seed(0)
        tensors: dict[str, torch.Tensor] = {}
        for n, m in metas.items():
            dt = getattr(torch, m.dtype)
            if m.is_float:
                t = torch.randn(shapes[n], generator=g).to(dt)
                t.requires_grad_(backward and n in grad_inputs)
            else:
                t = torch.zeros(shapes[n], dtype=dt)
            tensors[n] = t
        fn = resolve_target(node.target)
        args, kwargs = decode_arg(node.args, tensors), {k: decode_arg(v, tensors) for k, v in node.kwargs.items()}
        leaves = [t for t in tensors.values() if t.requires_grad]

        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(graph.precision)

        def step() -> None:
            with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):  # as the program runs
                out = fn(*args, **kwargs)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if leaves and out.requires_grad:
                torch.autograd.grad(out, leaves, torch.ones_like(out))

        _memo[key] = _median_s(step, REPEATS)
    except Exception:  # an op that needs its real neighbours (index ranges, ...): the roofline decides
        _memo[key] = None
    finally:
        torch.set_num_threads(threads)
    return _memo[key]


MOVE_REPEATS = 5


def time_move(meta: TensorMeta, src, dst, form: str, lengths: dict[int, tuple[int, ...]], rank: int,
              world: int, backward: bool) -> float | None:
    """Median seconds of the local work rank ``rank`` of ``world`` does to move a tensor from
    placement ``src`` to ``dst`` (``hap.runtime``'s collective, forward + backward if ``backward``):
    packing, unpacking and autograd, the raw send left out (``local_work_only``). ``lengths`` maps a
    tensor dim to its per-rank lengths. None where the move is not a collective (R -> S, R -> P) or
    cannot be run standalone. The emulation slows this work with the rank, and a formula of the
    bytes it copies misses most of it (packing, autograd), so it is timed."""
    from hap.runtime import dist as hd

    mv = move(src, dst)
    if not mv.is_collective or src.kind == "R" or not meta.is_float:
        return None
    key = ("move", meta.shape, meta.dtype, str(src), str(dst), form, _key_of(lengths), rank, world, backward)
    if key in _memo:
        return _memo[key]
    _memo[key] = None
    ndim = max(meta.ndim, 1)  # a scalar is only ever P or R: its dims are never read
    sd, dd = src.dim % ndim, dst.dim % ndim  # the sharded dims (where S), non-negative
    shape = list(meta.shape)
    if src.kind == "S":
        shape[sd] = lengths[sd][rank]

    src_shard = (sd, lengths[sd]) if src.kind == "S" else None
    dst_shard = (dd, lengths[dd]) if dst.kind == "S" else None

    def call(x: torch.Tensor) -> torch.Tensor:
        return mv.apply(x, src_shard, dst_shard, form)

    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)  # the primitives leave their outputs unwritten: no denormal slow paths
    try:
        torch.set_num_threads(1)
        x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0)).to(getattr(torch, meta.dtype))
        x.requires_grad_(backward)
        with hd.local_work_only(rank, world):
            def step() -> None:
                out = call(x)
                if backward:
                    torch.autograd.grad(out, [x], torch.ones_like(out))

            _memo[key] = _median_s(step, MOVE_REPEATS)
    except Exception:  # a move the runtime cannot make standalone: the formula decides
        _memo[key] = None
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    return _memo[key]


def local_shape(meta: TensorMeta, placement, lengths_of) -> tuple[int, ...] | None:
    """Shape of a tensor under ``placement`` on one rank; ``lengths_of(size, unit)`` gives the
    rank's length of a sharded dim. None for a placement the tensor cannot have."""
    shape = list(meta.shape)
    if placement.kind == "S":
        d = placement.dim if placement.dim >= 0 else placement.dim + len(shape)
        if not 0 <= d < len(shape) or shape[d] % placement.unit:
            return None
        shape[d] = lengths_of(shape[d], placement.unit)
    return tuple(shape)


def clear() -> None:
    _memo.clear()


def estimate_ok(flops: float, rate: float) -> bool:
    return math.isfinite(flops) and flops * 3 / max(rate, 1.0) < MAX_CALL_S

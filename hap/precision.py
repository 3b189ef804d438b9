"""Compute precision: which autocast dtype a plan trains in, and what the graph looks like under it.

A plan's precision is ``fp32`` (no autocast: it trains exactly what the user's fp32 program
trains), ``bf16`` or ``fp16`` (``torch.autocast`` with that dtype around forward, fp32 master
weights, gradients and optimizer state; fp16 adds dynamic loss scaling). ``auto`` picks the
fastest dtype that every device of the cluster runs at speed:

    bf16  where every device's bf16 matmul rate is at least FAST_ENOUGH x its fp32 rate
          (A100, H100, L4, A10; a CPU with AVX512-BF16 or AMX)
    fp16  else, where every device's fp16 rate is (V100, P100, T4), with loss scaling
    fp32  otherwise (a CPU without bf16 units runs fp16 autocast several times slower)

Under autocast the same graph moves other bytes: matmul-class ops (linear, conv, attention)
compute in the low dtype and what reads them inherits it until type promotion with an fp32
tensor (a residual add, an fp32 parameter) or an op autocast keeps in fp32 (the losses)
lifts it back. ``autocast_graph`` finds every node's dtype the way the program will meet
it: by running the captured ops under ``torch.autocast`` on fake tensors (no memory, no
compute), so the cost model prices compute at the dtype's rate and activations, resharding
and saved tensors at its width. Planning uses the CPU autocast op lists for every device;
CUDA keeps a few more ops (layer_norm, softmax) in fp32, which only changes byte counts.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from hap.graph import DTYPE_BYTES, Graph, Node, TensorMeta, decode_arg, resolve_target

if TYPE_CHECKING:
    from hap.cluster import Cluster

PRECISIONS = ("fp32", "bf16", "fp16")
CHOICES = (*PRECISIONS, "auto")
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ASSERT_METADATA = "aten._assert_tensor_metadata.default"
FAST_ENOUGH = 1.3  # a low-precision rate this many times fp32's pays for autocast's casts


def choose(cluster: Cluster, requested: str) -> tuple[str, str]:
    """(precision, why) for ``requested`` in CHOICES on ``cluster``."""
    if requested not in CHOICES:
        from hap.errors import HapError

        raise HapError(f"precision {requested!r} is not one of {', '.join(CHOICES)}")
    if requested != "auto":
        return requested, "as requested" if requested != "fp32" else "the default: trains exactly what fp32 trains"
    speed = {name: {dt: p.compute_rate("matmul", dt) / p.compute_rate("matmul", "fp32") for dt in ("bf16", "fp16")}
             for name, p in cluster.devices.items() if name in {r.device for r in cluster.ranks}}

    def slowest(dt: str) -> tuple[str, float]:
        return min(((name, s[dt]) for name, s in speed.items()), key=lambda x: x[1])

    for dt, how in (("bf16", "bf16 autocast"), ("fp16", "fp16 autocast with dynamic loss scaling")):
        name, ratio = slowest(dt)
        if ratio >= FAST_ENOUGH:
            return dt, f"auto: every device runs {dt} matmuls at least {ratio:.1f}x its fp32 rate ({how})"
    b_name, b_ratio = slowest("bf16")
    f_name, f_ratio = slowest("fp16")
    return "fp32", (f"auto: {b_name} runs bf16 at {b_ratio:.2f}x and {f_name} fp16 at {f_ratio:.2f}x its fp32 rate; "
                    "neither is faster on every device")


def _tensor_meta(x: object) -> TensorMeta | None:
    if isinstance(x, torch.Tensor):
        return TensorMeta(tuple(x.shape), str(x.dtype).removeprefix("torch."))
    return None


def training_graph(graph: Graph, precision: str, grad_reduce: str = "fp32") -> Graph:
    """``graph`` as it trains: node dtypes under ``precision``'s autocast, gradients all-reduced
    in ``grad_reduce`` (fp32, or bf16: half the bytes on the wire)."""
    if grad_reduce not in ("fp32", "bf16"):
        from hap.errors import HapError

        raise HapError(f"gradient reduction dtype {grad_reduce!r} is not one of fp32, bf16")
    return dataclasses.replace(autocast_graph(graph, precision), grad_reduce=grad_reduce)


def autocast_graph(graph: Graph, precision: str) -> Graph:
    """``graph`` with every node's dtype as it runs under autocast with ``precision`` (and each
    op's bytes counted at those widths); the graph itself for fp32. Parameters stay fp32: they
    are the master weights. A node whose op cannot run on fake tensors keeps its captured dtype."""
    if precision == "fp32":
        return graph
    # an op fake tensors cannot run (histc of an int tensor on the CPU's kernels) is expected and
    # handled there (the node keeps its captured dtype); torch would log each at ERROR with a traceback
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        return _autocast_graph(graph, precision)
    finally:
        fake_log.setLevel(level)


def _autocast_graph(graph: Graph, precision: str) -> Graph:
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = TORCH_DTYPE[precision]
    nodes: list[Node] = []
    metas = {n.name: n.meta for n in graph}  # updated as nodes get their autocast dtypes
    with FakeTensorMode(allow_non_fake_inputs=True):
        values: dict[str, object] = {}
        for node in graph:
            meta = node.meta
            if node.kind != "op":
                if isinstance(meta, TensorMeta):
                    values[node.name] = torch.empty(meta.shape, dtype=getattr(torch, meta.dtype))
                nodes.append(node)
                continue
            if node.target == ASSERT_METADATA and "dtype" in node.kwargs:
                # export asserts the dtype a `.to(dtype)` met at capture; under autocast that input
                # has the low dtype (the `.to` after it still converts), so the dtype is not asserted
                node = dataclasses.replace(node, kwargs={k: v for k, v in node.kwargs.items() if k != "dtype"})
            try:
                args = decode_arg(node.args, values)
                kwargs = {k: decode_arg(v, values) for k, v in node.kwargs.items()}
                with torch.autocast("cpu", dtype=dtype):
                    out = resolve_target(node.target)(*args, **kwargs)
            except Exception:  # noqa: BLE001  (an op fake tensors cannot run: keep what capture saw)
                out = None
            if out is None:
                values[node.name] = _stand_in(meta)
                nodes.append(node)
                continue
            values[node.name] = out
            new_meta = _meta_like(meta, out)
            nodes.append(dataclasses.replace(node, meta=new_meta, bytes=_bytes(node, new_meta, graph, metas)))
            metas[node.name] = new_meta
    return dataclasses.replace(graph, nodes=nodes, precision=precision)


def _stand_in(meta: object) -> object:
    if isinstance(meta, TensorMeta):
        return torch.empty(meta.shape, dtype=getattr(torch, meta.dtype))
    if isinstance(meta, list):
        return [torch.empty(m.shape, dtype=getattr(torch, m.dtype)) for m in meta]
    return None


def _meta_like(meta: object, out: object) -> object:
    """The captured meta with dtypes from ``out`` (shapes stay as captured)."""
    if isinstance(meta, TensorMeta):
        got = _tensor_meta(out if not isinstance(out, (list, tuple)) else (out[0] if out else None))
        return TensorMeta(meta.shape, got.dtype) if got is not None else meta
    if isinstance(meta, list) and isinstance(out, (list, tuple)):
        return [TensorMeta(m.shape, (_tensor_meta(o) or m).dtype) for m, o in zip(meta, out)]
    return meta


def _bytes(node: Node, meta: object, graph: Graph, metas: dict[str, object]) -> float:
    """Forward bytes read + written at the dtypes under autocast, in proportion to capture's count."""
    def width(m: object) -> float:
        ms = m if isinstance(m, list) else [m] if isinstance(m, TensorMeta) else []
        return sum(x.numel * DTYPE_BYTES.get(x.dtype, 4) for x in ms)

    before = width(node.meta) + sum(width(graph[i].meta) for i in node.inputs())
    after = width(meta) + sum(width(metas[i]) for i in node.inputs())
    return node.bytes * (after / before) if before else node.bytes

"""What is measured: compute (matmul, convolution, attention, memory-bound ops, the kernel
floor) and the collectives through ``hap.runtime``, and ``measure``, which runs them all in
the same order on every rank."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .harness import UNEVEN, Bench, Measurement, Settings

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
    from hap.runtime.shares import largest_remainder

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

"""Differentiable collectives over uneven shards.

Placements: R (replicated), S(d) (sharded on dim d, per-rank `lengths`, any may be 0), P (partial:
each rank holds a full-shaped addend). The global loss is P, so the gradient of an R tensor is P,
of a P tensor R, of S(d) S(d). Hence the backward of each collective is its dual:

    all_gather      S(d) -> R      backward: reduce_scatter  P -> S(d)
    all_reduce      P    -> R      backward: all_reduce
    reduce_scatter  P    -> S(d)   backward: all_gather      S(d) -> R
    all_to_all      S(a) -> S(b)   backward: all_to_all      S(b) -> S(a)
    slice_local     R    -> S(d)   narrow (autograd gives the zero-padded grad: a valid P)
    to_partial      R    -> P      rank 0 keeps x, the others hold zeros

`form="padded"` pads every shard to the largest one and runs one equal-size collective, then trims;
`form="grouped"` moves exactly the bytes each owner has (all_to_all_single with split sizes). Both
give identical results; the plan picks one per edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager

import torch

from . import dist as _d
from . import emulate
from .shares import offset

FORMS = ("padded", "grouped")


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------

def _norm_dim(x: torch.Tensor, dim: int, op: str) -> int:
    nd = x.dim()
    if not -nd <= dim < nd or nd == 0:
        raise ValueError(f"hap.runtime.{op}: dim {dim} is out of range for a tensor of shape "
                         f"{tuple(x.shape)}")
    return dim % nd


def _lengths(lengths: Sequence[int], op: str, what: str = "lengths") -> tuple[int, ...]:
    ls = tuple(int(v) for v in lengths)
    n = _d.world_size()
    if len(ls) != n:
        raise ValueError(f"hap.runtime.{op}: {what} {ls} has {len(ls)} entries but the world size is {n}; "
                         "the program was emitted for a different number of ranks")
    if any(v < 0 for v in ls):
        raise ValueError(f"hap.runtime.{op}: {what} {ls} has a negative length")
    return ls


def _form(form: str, op: str) -> str:
    if form not in FORMS:
        raise ValueError(f"hap.runtime.{op}: form must be one of {FORMS}, got {form!r}")
    return form


def _check_size(x: torch.Tensor, dim: int, want: int, op: str, what: str) -> None:
    if x.shape[dim] != want:
        raise ValueError(f"hap.runtime.{op}: rank {_d.rank()} holds a tensor of shape {tuple(x.shape)} "
                         f"whose dim {dim} is {x.shape[dim]}, but {what} is {want}")


def _offsets(ls: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for v in ls:
        out.append(acc)
        acc += v
    return out


def _local_step() -> None:
    """A collective in single-process mode: nothing to send, but emulation still sees it."""
    emulate.before_comm()
    emulate.after_comm()


# ----------------------------------------------------------------------------------------------
# non-differentiable implementations (dim already normalised, lengths validated, world > 1)
# ----------------------------------------------------------------------------------------------

def _blocks(x: torch.Tensor, dim: int) -> tuple[int, int]:
    """(A, B) with x viewed as [A, x.shape[dim], B]: a rank's shard of dim is then A rows of
    contiguous runs, so shards move without transposing the tensor."""
    return math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1:])


def _with_dim(x: torch.Tensor, dim: int, length: int) -> tuple[int, ...]:
    shape = list(x.shape)
    shape[dim] = length
    return tuple(shape)


def _gather_impl(x: torch.Tensor, dim: int, ls: tuple[int, ...], form: str) -> torch.Tensor:
    return _gather_start(x, dim, ls, form, async_op=False)()


def _gather_start(x: torch.Tensor, dim: int, ls: tuple[int, ...], form: str,
                  async_op: bool) -> Callable[[], torch.Tensor]:
    """Start the all-gather of ``x``'s shard; the returned function waits for it (``async_op``)
    and assembles the whole tensor."""
    n, r = _d.world_size(), _d.rank()
    a, b = _blocks(x, dim)
    total = sum(ls)
    if total == 0 or a * b == 0:
        _local_step()
        return lambda: x.new_empty(_with_dim(x, dim, total))
    x3 = x.reshape(a, ls[r], b)
    if form == "padded":
        m = max(ls)
        buf = x.new_zeros((a, m, b))
        buf[:, : ls[r]] = x3
        flat = x.new_empty((n * a * m * b,))
        sent = buf
        work = _d._all_gather_equal(flat, buf.reshape(-1), async_op=async_op)

        def pieces() -> list[torch.Tensor]:
            full = flat.view(n, a, m, b)
            return [full[i, :, : ls[i]] for i in range(n)]
    else:
        mine = x3.reshape(-1)
        inp = torch.cat([mine] * n) if n > 1 else mine
        counts = [a * v * b for v in ls]
        flat = x.new_empty((sum(counts),))
        sent = inp
        work = _d._all_to_all(flat, inp, counts, [mine.numel()] * n, async_op=async_op)

        def pieces() -> list[torch.Tensor]:
            return [p.view(a, v, b) for p, v in zip(flat.split(counts), ls)]

    def finish() -> torch.Tensor:
        nonlocal sent
        if async_op:
            _d._wait(work)
        sent = None  # the sent buffer lives until the collective is done
        return torch.cat(pieces(), dim=1).view(_with_dim(x, dim, total))
    return finish


def _reduce_scatter_impl(x: torch.Tensor, dim: int, ls: tuple[int, ...], form: str) -> torch.Tensor:
    return _reduce_scatter_start(x, dim, ls, form, async_op=False)()


def _reduce_scatter_start(x: torch.Tensor, dim: int, ls: tuple[int, ...], form: str,
                          async_op: bool) -> Callable[[], torch.Tensor]:
    """Start the reduce-scatter of ``x``; the returned function waits for it (``async_op``) and
    gives this rank's rows of the sum."""
    n, r = _d.world_size(), _d.rank()
    a, b = _blocks(x, dim)
    offs = _offsets(ls)
    if sum(ls) == 0 or a * b == 0:
        _local_step()
        return lambda: x.new_zeros(_with_dim(x, dim, ls[r]))
    x3 = x.reshape(a, x.shape[dim], b)
    if form == "padded":
        m = max(ls)
        buf = x.new_zeros((n, a, m, b))
        for i in range(n):
            if ls[i]:
                buf[i, :, : ls[i]] = x3[:, offs[i]: offs[i] + ls[i]]
        res = x.new_empty((a * m * b,))
        sent = buf
        work = _d._reduce_scatter_equal(res, buf.view(-1), async_op=async_op)

        def mine() -> torch.Tensor:
            return res.view(a, m, b)[:, : ls[r]]
    else:
        send = torch.cat([x3[:, offs[i]: offs[i] + ls[i]].reshape(-1) for i in range(n)])
        recv = x.new_empty((n * a * ls[r] * b,))
        sent = send
        work = _d._all_to_all(recv, send, [a * ls[r] * b] * n, [a * v * b for v in ls], async_op=async_op)

        def mine() -> torch.Tensor:
            return recv.view(n, a, ls[r], b).sum(0)

    def finish() -> torch.Tensor:
        nonlocal sent
        if async_op:
            _d._wait(work)
        sent = None  # the sent buffer lives until the collective is done
        return mine().reshape(_with_dim(x, dim, ls[r]))
    return finish


def _all_reduce_impl(x: torch.Tensor) -> torch.Tensor:
    buf = x.detach().clone(memory_format=torch.contiguous_format)
    _d._all_reduce(buf)
    return buf


def _a2a_chunks(shape: tuple[int, ...], src: int, sl: tuple[int, ...], dst: int, dl: tuple[int, ...],
                i: int, j: int) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """What rank i sends to rank j: ((dim, start, length) in i's local tensor, shape of the piece).

    `shape` is the local shape with the src dim set to anything (it is replaced by sl[i]).
    """
    local = list(shape)
    local[src] = sl[i]
    if src != dst:
        start, length = _offsets(dl)[j], dl[j]
        piece = list(local)
        piece[dst] = length
        return (dst, start, length), tuple(piece)
    a, b = _offsets(sl)[i], _offsets(dl)[j]
    lo, hi = max(a, b), min(a + sl[i], b + dl[j])
    length = max(0, hi - lo)
    piece = list(local)
    piece[src] = length
    return (src, lo - a if length else 0, length), tuple(piece)


def _a2a_impl(x: torch.Tensor, src: int, sl: tuple[int, ...], dst: int, dl: tuple[int, ...],
              form: str) -> torch.Tensor:
    n, r = _d.world_size(), _d.rank()
    shape = tuple(x.shape)
    sends = [_a2a_chunks(shape, src, sl, dst, dl, r, j) for j in range(n)]
    recvs = [_a2a_chunks(shape, src, sl, dst, dl, i, r)[1] for i in range(n)]
    send_numel = [math.prod(p) for _, p in sends]
    recv_numel = [math.prod(p) for p in recvs]
    biggest = max(math.prod(_a2a_chunks(shape, src, sl, dst, dl, i, j)[1]) for i in range(n) for j in range(n))
    flat = [x.narrow(d, s, ln).reshape(-1) for (d, s, ln), _ in sends]
    if biggest == 0:  # nothing moves anywhere (every rank knows it): no communication
        _local_step()
        pieces = [x.new_empty((0,))] * n
    elif form == "padded":
        buf = x.new_zeros((n * biggest,))
        for j in range(n):
            if send_numel[j]:
                buf[j * biggest: j * biggest + send_numel[j]] = flat[j]
        out_flat = x.new_empty((n * biggest,))
        _d._all_to_all(out_flat, buf, None, None)
        pieces = [out_flat[i * biggest: i * biggest + recv_numel[i]] for i in range(n)]
    else:
        inp = torch.cat(flat)
        out_flat = x.new_empty((sum(recv_numel),))
        _d._all_to_all(out_flat, inp, recv_numel, send_numel)
        pieces = list(out_flat.split(recv_numel))
    parts = [p.view(s) for p, s in zip(pieces, recvs, strict=True)]
    return torch.cat(parts, dim=src).contiguous()


# ----------------------------------------------------------------------------------------------
# autograd functions
# ----------------------------------------------------------------------------------------------

_deferred: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]] | None = None  # inside deferred_grads()


@contextmanager
def deferred_grads():
    """Backward inside this block starts each gathered weight's reduce-scatter and goes on
    computing; on leaving it, every reduce-scatter is waited for and its rows added to the
    weight's ``.grad`` (as autograd would have), so the scatters overlap the rest of backward."""
    global _deferred
    outer, _deferred = _deferred, []
    try:
        yield
        with torch.no_grad():
            for p, finish in _deferred:
                g = finish().to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone(memory_format=torch.contiguous_format)
                else:
                    p.grad.add_(g)
    finally:
        _deferred = outer


def remember(ctx, x: torch.Tensor, dim: int, ls: tuple[int, ...], form: str) -> None:
    """What an all-gather's backward needs: its layout, ``x``'s dtype, and ``x`` itself where it
    is a weight (a leaf), whose gradient ``scatter_back`` may leave to ``deferred_grads``."""
    ctx.args, ctx.dtype = (dim, ls, form), x.dtype
    ctx.weight = x if x.is_leaf and x.requires_grad else None


def scatter_back(ctx, g: torch.Tensor) -> torch.Tensor | None:
    """An all-gather's backward: the reduce-scatter of ``g`` in the gathered tensor's dtype; for a
    weight inside ``deferred_grads``, started and left running (its rows reach ``.grad`` there)."""
    dim, ls, form = ctx.args
    if _deferred is not None and ctx.weight is not None and not torch.is_grad_enabled():
        _deferred.append((ctx.weight, _reduce_scatter_start(g.to(ctx.dtype).contiguous(), dim, ls, form,
                                                            async_op=True)))
        return None
    return _ReduceScatter.apply(g.to(ctx.dtype), dim, ls, form)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, ls, form):
        remember(ctx, x, dim, ls, form)
        return _gather_impl(x, dim, ls, form)

    @staticmethod
    def backward(ctx, g):
        return scatter_back(ctx, g), None, None, None


class _AllGatherCast(torch.autograd.Function):
    """All-gather of the shards cast to a lower dtype: the copy autocast would make of the whole
    tensor, in half the bytes (a cast commutes with a gather). Backward casts the gradient back
    before the reduce-scatter, as autocast's cast does before any sum over ranks."""

    @staticmethod
    def forward(ctx, x, dim, ls, form, dtype):
        remember(ctx, x, dim, ls, form)
        return _gather_impl(x.to(dtype), dim, ls, form)

    @staticmethod
    def backward(ctx, g):
        return scatter_back(ctx, g), None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, ls, form):
        ctx.args = (dim, ls, form)
        return _reduce_scatter_impl(x, dim, ls, form)

    @staticmethod
    def backward(ctx, g):
        dim, ls, form = ctx.args
        return _AllGather.apply(g, dim, ls, form), None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce_impl(x)

    @staticmethod
    def backward(ctx, g):
        return _AllReduce.apply(g)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, sl, dst, dl, form):
        ctx.args = (src, sl, dst, dl, form)
        return _a2a_impl(x, src, sl, dst, dl, form)

    @staticmethod
    def backward(ctx, g):
        src, sl, dst, dl, form = ctx.args
        return _AllToAll.apply(g, dst, dl, src, sl, form), None, None, None, None, None


class _ToPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.keep = _d.rank() == 0
        return x.clone() if ctx.keep else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, g):
        return g if ctx.keep else torch.zeros_like(g)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

LOW_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _gather_args(x: torch.Tensor, dim: int, lengths: Sequence[int], form: str, cast: str | None,
                 op: str) -> tuple[int, tuple[int, ...]]:
    """An all-gather's arguments checked (``op`` names the caller): its dim and lengths."""
    dim = _norm_dim(x, dim, op)
    ls = _lengths(lengths, op)
    _form(form, op)
    _check_size(x, dim, ls[_d.rank()], op, f"lengths[{_d.rank()}]")
    if cast is not None and cast not in LOW_DTYPES:
        raise ValueError(f"hap.runtime.{op}: cast must be one of {sorted(LOW_DTYPES)}, got {cast!r}")
    return dim, ls


def all_gather(x: torch.Tensor, dim: int, lengths: Sequence[int], form: str = "padded",
               cast: str | None = None) -> torch.Tensor:
    """S(dim) -> R: concatenate every rank's shard (rank r holds lengths[r] rows) along `dim`;
    with ``cast`` ("bfloat16" or "float16"), the shards cast to that dtype (what autocast makes
    of a weight its matmuls read), their gradient cast back to x's dtype before it is summed."""
    dim, ls = _gather_args(x, dim, lengths, form, cast, "all_gather")
    if not _d.is_distributed():
        _local_step()
        return x if cast is None else x.to(LOW_DTYPES[cast])
    if cast is not None:
        return _AllGatherCast.apply(x, dim, ls, form, LOW_DTYPES[cast])
    return _AllGather.apply(x, dim, ls, form)


def reduce_scatter(x: torch.Tensor, dim: int, lengths: Sequence[int], form: str = "padded") -> torch.Tensor:
    """P -> S(dim): sum the full-shaped addends over ranks; rank r keeps its lengths[r] rows."""
    dim = _norm_dim(x, dim, "reduce_scatter")
    ls = _lengths(lengths, "reduce_scatter")
    _form(form, "reduce_scatter")
    _check_size(x, dim, sum(ls), "reduce_scatter", "sum(lengths)")
    if not _d.is_distributed():
        _local_step()
        return x
    return _ReduceScatter.apply(x, dim, ls, form)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """P -> R: the sum over ranks."""
    if not _d.is_distributed():
        _local_step()
        return x
    return _AllReduce.apply(x)


def all_to_all(x: torch.Tensor, src_dim: int, src_lengths: Sequence[int], dst_dim: int,
               dst_lengths: Sequence[int], form: str = "grouped") -> torch.Tensor:
    """S(src_dim) -> S(dst_dim). With src_dim == dst_dim it re-splits the same dim to new lengths."""
    src = _norm_dim(x, src_dim, "all_to_all")
    dst = _norm_dim(x, dst_dim, "all_to_all")
    sl = _lengths(src_lengths, "all_to_all", "src_lengths")
    dl = _lengths(dst_lengths, "all_to_all", "dst_lengths")
    _form(form, "all_to_all")
    r = _d.rank()
    _check_size(x, src, sl[r], "all_to_all", f"src_lengths[{r}]")
    if src == dst:
        if sum(sl) != sum(dl):
            raise ValueError(f"hap.runtime.all_to_all: re-split of dim {src} needs sum(src_lengths) == "
                             f"sum(dst_lengths), got {sl} and {dl}")
    else:
        _check_size(x, dst, sum(dl), "all_to_all", "sum(dst_lengths)")
    if not _d.is_distributed():
        _local_step()
        return x
    return _AllToAll.apply(x, src, sl, dst, dl, form)


def slice_local(x: torch.Tensor, dim: int, lengths: Sequence[int]) -> torch.Tensor:
    """R -> S(dim): this rank's rows. A copy, so the shard never aliases the full tensor."""
    dim = _norm_dim(x, dim, "slice_local")
    ls = _lengths(lengths, "slice_local")
    _check_size(x, dim, sum(ls), "slice_local", "sum(lengths)")
    r = _d.rank()
    return x.narrow(dim, offset(ls, r), ls[r]).clone(memory_format=torch.contiguous_format)


def to_partial(x: torch.Tensor) -> torch.Tensor:
    """R -> P: rank 0 holds x, the other ranks zeros (grad flows to rank 0's copy only)."""
    if not _d.is_distributed():
        return x
    return _ToPartial.apply(x)


def sum_scalar(x: float | torch.Tensor) -> float:
    """Sum of a number over ranks (not differentiable): global loss, counts, for logging."""
    if isinstance(x, torch.Tensor):
        x = float(x.detach().sum().item()) if x.numel() != 1 else float(x.detach().item())
    if not _d.is_distributed():
        _local_step()
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_d.device())
    _d._all_reduce(t)
    return float(t.item())


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor's sum over ranks, as a tensor on the same device (not differentiable; no
    ``.item()``, so a GPU rank does not wait for its queued kernels)."""
    t = x.detach().reshape(1).clone()
    if _d.is_distributed():
        _d._all_reduce(t)
    else:
        _local_step()
    return t.reshape(())


def broadcast_(t: torch.Tensor, src: int = 0) -> None:
    """In place: every rank's `t` becomes rank `src`'s."""
    if not _d.is_distributed():
        return
    if not 0 <= src < _d.world_size():
        raise ValueError(f"hap.runtime.broadcast_: src {src} is not a rank (world size {_d.world_size()})")
    with torch.no_grad():
        buf = t if t.is_contiguous() and t.dtype != torch.bool else _d._wire(t).clone()
        _d._broadcast(buf, src)
        if buf is not t:
            t.copy_(buf.view(torch.bool) if t.dtype == torch.bool else buf)


def gather_full(x: torch.Tensor, placement_kind: str, dim: int, lengths: Sequence[int]) -> torch.Tensor:
    """The full tensor on every rank from a local R / S / P value (not differentiable).

    `placement_kind` is "R", "S" (sharded on `dim` with `lengths`) or "P" (summed); "S(d)" is
    accepted too. For R and P, `dim` and `lengths` are ignored.
    """
    kind = placement_kind.strip().upper()
    if kind.startswith("S"):
        kind = "S"
    with torch.no_grad():
        x = x.detach()
        if kind == "R":
            return x.clone()
        if kind == "P":
            return _all_reduce_impl(x) if _d.is_distributed() else x.clone()
        if kind == "S":
            d = _norm_dim(x, dim, "gather_full")
            ls = _lengths(lengths, "gather_full")
            _check_size(x, d, ls[_d.rank()], "gather_full", f"lengths[{_d.rank()}]")
            if not _d.is_distributed():
                return x.clone()
            return _gather_impl(x, d, ls, "grouped")
    raise ValueError(f"hap.runtime.gather_full: placement_kind must be 'R', 'S' or 'P', got {placement_kind!r}")


_BUCKETS: dict[tuple, torch.Tensor] = {}  # flat all-reduce buffers, kept from step to step


def _bucket_buffer(bucket: list[torch.Tensor], extra: int) -> torch.Tensor:
    """The flat buffer of this bucket: allocated once and reused every step, as DDP's buckets are
    (a fresh multi-MB buffer per step is page-faulted in again each time; docs/benchmarks.md)."""
    g = bucket[0].grad
    key = (tuple(id(p) for p in bucket), extra, g.dtype, g.device)
    buf = _BUCKETS.get(key)
    numel = sum(p.numel() for p in bucket) + extra
    if buf is None or buf.numel() != numel:
        if len(_BUCKETS) > 64:  # parameters come and go (tests, several models): forget old buckets
            _BUCKETS.clear()
        buf = _BUCKETS[key] = torch.empty(numel, dtype=g.dtype, device=g.device)
    return buf


def fill_missing_grads(params: Iterable[torch.Tensor]) -> None:
    """A parameter this rank did not use gets a zero gradient: its addend to the sum."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)


def pack_bucket(bucket: list[torch.Tensor], loss: torch.Tensor | None = None) -> torch.Tensor:
    """The bucket's gradients (and the loss, last) copied into its persistent flat buffer."""
    fill_missing_grads(bucket)
    with torch.no_grad():
        parts = [p.grad.reshape(-1) for p in bucket]
        if loss is not None:
            parts.append(loss.detach().reshape(-1).to(parts[0].dtype))
        flat = _bucket_buffer(bucket, 0 if loss is None else parts[-1].numel())
        if any(x.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for x in parts):
            parts = [x.clone() for x in parts]  # reduced again without a new backward: grads view `flat`
        torch.cat(parts, out=flat)
    return flat


def unpack_bucket(bucket: list[torch.Tensor], flat: torch.Tensor, has_loss: bool) -> torch.Tensor | None:
    """After the all-reduce: the gradients become views of the reduced buffer (no copy back);
    returns the summed values that rode along after them (the loss first), if any did."""
    off = 0
    for p in bucket:
        k = p.numel()
        p.grad = flat[off: off + k].view_as(p)
        off += k
    return flat[off:].detach().clone() if has_loss else None

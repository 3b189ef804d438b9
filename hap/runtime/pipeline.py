"""Pipeline stages: how a stage's ranks split each micro-batch, and the point-to-point exchange of
a micro-batch's rows across the cut between two stages.

A stage is a set of global ranks that together process every sample of the global batch ``B``,
rank ``r`` of the stage ``shares[r]`` of them. A step runs in ``m`` micro-batches. Micro-batch
``j`` is the same samples in every stage: positions ``[c_j, c_{j+1})`` of the global batch, the
chunk sizes being ``micro.pieces(B, m)``. Within it, a stage's ranks hold consecutive rows in rank
order, rank ``r`` ``u_j[r]`` of them (``micro_rows``). Two stages split a micro-batch among
different ranks, so across a cut each sender sends each receiver the rows they have in common
(``overlaps``): activations forward, their gradients backward (``send_cut``, ``receive_cut``).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
import torch.distributed as tdist

from . import dist as _d
from . import emulate
from .micro import pieces
from .shares import offset

SCHEDULES = ("1f1b", "gpipe")


def stage_order(schedule: str, stage: int, stages: int, m: int, warmup: int = 0) -> list[tuple[str, int]]:
    """The order stage ``stage`` of ``stages`` runs a step's ``m`` micro-batches in: ``F`` is a
    forward whose activations are kept for its backward ``B``; the last stage runs ``B``
    (forward and backward at once) of each micro-batch as it arrives.

    - ``1f1b``: a stage that sends runs ``F`` of the first ``stages - 1 - stage + warmup``
      micro-batches (at most ``m``), then alternates ``F`` of the next with ``B`` of the oldest,
      then the remaining ``B``; stage ``s`` keeps at most ``stages - s + warmup`` micro-batches'
      activations. ``warmup`` > 0 runs further ahead than 1F1B needs, so that a micro-batch's
      gradients can take a slow cut's round trip while later forwards run.
    - ``gpipe``: every ``F``, then every ``B``: the whole batch's activations kept, and no wait on
      a round trip through the later stages while micro-batches are left to send, which 1F1B's
      short warm-up cannot cover where a cut's transfer outlasts a micro-batch's compute.

    Neither deadlocks: the sends do not block, every stage runs at least as far ahead as the
    next, and every receive waits on a step its sender runs before any receive of its own that
    could wait on this stage. The planner prices the same orders (``hap.pipeline.schedule_s``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"stage_order: schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if stage == stages - 1:
        return [("B", j) for j in range(m)]
    if schedule == "gpipe":
        return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
    warm = min(stages - 1 - stage + warmup, m)
    order = [("F", j) for j in range(warm)]
    for j in range(m):
        if j + warm < m:
            order.append(("F", j + warm))
        order.append(("B", j))
    return order


def in_flight(schedule: str, stage: int, stages: int, m: int, warmup: int = 0) -> int:
    """The most micro-batches whose activations stage ``stage`` keeps at once under
    ``stage_order``: a ``F`` keeps them until its ``B``; the last stage keeps one, its ``B``
    running forward and backward together."""
    if stage == stages - 1:
        return 1
    live = most = 0
    for kind, _ in stage_order(schedule, stage, stages, m, warmup):
        live += 1 if kind == "F" else -1
        most = max(most, live)
    return most


def micro_rows(shares: Sequence[int], m: int) -> list[tuple[int, ...]]:
    """Per micro-batch, every rank's rows: ``u[j][r]``, with ``sum(u[j]) == pieces(B, m)[j]``
    (the canonical chunk) and ``sum_j u[j][r] == shares[r]`` (the rank's share).

    Every entry is the floor or the ceiling of its proportional part ``shares[r] * chunk_j / B``,
    so each rank's load is as even over the micro-batches as integers allow (such a matrix always
    exists: the proportional one has these margins, and a flow with integer bounds has an integer
    solution). Rows are rounded in order, each row's extra units going to the ranks furthest
    behind their proportional running total (ties to the lower rank); a column that still misses
    its share (none in practice) is then evened out along augmenting paths. Integer arithmetic only, so every
    rank computes the same matrix. A rank with share 0 gets 0 everywhere; ``m > B`` gives empty
    micro-batches at the end.
    """
    shares = tuple(int(s) for s in shares)
    if m < 1:
        raise ValueError(f"micro_rows: needs at least one micro-batch (got m={m})")
    if any(s < 0 for s in shares):
        raise ValueError(f"micro_rows: negative share in {list(shares)}")
    n, total = len(shares), sum(shares)
    if total == 0:
        return [(0,) * n for _ in range(m)]
    chunks = pieces(total, m)
    lo = [[s * c // total for s in shares] for c in chunks]
    rem = [[s * c % total for s in shares] for c in chunks]  # the fractional part, in units of 1/B
    hi = [[f + (1 if q else 0) for f, q in zip(lo_j, rem_j)] for lo_j, rem_j in zip(lo, rem)]
    u: list[list[int]] = []
    got = [0] * n  # rows so far per rank
    upto = 0  # samples in the chunks so far
    for j, c in enumerate(chunks):
        upto += c
        row = list(lo[j])
        # behind[r] x B: how far the rank falls behind its proportional running total on the floor
        order = sorted((r for r in range(n) if rem[j][r]),
                       key=lambda r: (-(shares[r] * upto - total * (got[r] + lo[j][r])), r))
        for r in order[: c - sum(row)]:
            row[r] += 1
        u.append(row)
        got = [g + x for g, x in zip(got, row)]
    _even_columns(u, lo, hi, rem, shares)
    return [tuple(row) for row in u]


def _even_columns(u: list[list[int]], lo: list[list[int]], hi: list[list[int]], rem: list[list[int]],
                  shares: tuple[int, ...]) -> None:
    """Move units within rows (each entry staying within [lo, hi]) until every column sums to its
    share: along a shortest path of columns from one with too many to one with too few, each step
    a row where the first can give a unit and the next can take one. A path always exists while
    a column is off (max-flow min-cut: the proportional matrix is a fractional solution)."""
    n, m = len(shares), len(u)
    col = [sum(row[r] for row in u) for r in range(n)]

    def move(a: int, b: int) -> int | None:  # the row that best moves a unit from column a to b
        best = None
        for j in range(m):
            if u[j][a] > lo[j][a] and u[j][b] < hi[j][b]:
                # prefer rounding a down where its fraction is small and b up where its fraction is large
                key = (rem[j][b] - rem[j][a], -j)
                if best is None or key > best[0]:
                    best = (key, j)
        return None if best is None else best[1]

    while True:
        over = [r for r in range(n) if col[r] > shares[r]]
        if not over:
            return
        prev: dict[int, tuple[int, int] | None] = {a: None for a in over}
        queue = deque(over)
        end = None
        while queue and end is None:
            a = queue.popleft()
            for b in range(n):
                if b in prev:
                    continue
                j = move(a, b)
                if j is None:
                    continue
                prev[b] = (a, j)
                if col[b] < shares[b]:
                    end = b
                    break
                queue.append(b)
        if end is None:  # cannot happen for margins of a proportional matrix
            raise AssertionError(f"micro_rows: no integer rounding of {list(shares)} found")
        b = end
        while prev[b] is not None:
            a, j = prev[b]
            u[j][a] -= 1
            u[j][b] += 1
            b = a
        col[b] -= 1
        col[end] += 1


def stage_positions(shares: Sequence[int], rows: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The stage's order of the global batch positions ``0..B-1``: rank ``r``'s contiguous range
    ``[offset(shares, r), offset(shares, r) + shares[r])`` of it lists the canonical positions of
    the rank's pieces, micro-batch after micro-batch (piece ``j`` is positions
    ``c_j + offset(rows[j], r)`` onwards, ``rows[j][r]`` of them).

    A data loader that hands rank ``r`` the samples ``perm[order[lo:lo + share]]`` of a step's
    permutation ``perm`` then gives every stage the same samples in micro-batch ``j``, though
    the stages split them differently. ``rows`` is ``micro_rows(shares, m)``.
    """
    shares = tuple(shares)
    n = len(shares)
    if any(len(row) != n for row in rows):
        raise ValueError(f"stage_positions: every micro-batch needs {n} rows (one per rank)")
    got = [sum(row[r] for row in rows) for r in range(n)]
    if got != list(shares):
        raise ValueError(f"stage_positions: the micro-batches' rows sum to {got} per rank, not the shares "
                         f"{list(shares)}")
    starts, c = [], 0
    for row in rows:
        starts.append(c)
        c += sum(row)
    order: list[int] = []
    for r in range(n):
        for row, c_j in zip(rows, starts):
            lo = c_j + offset(row, r)
            order.extend(range(lo, lo + row[r]))
    return tuple(order)


def overlaps(send_rows: Sequence[int], recv_rows: Sequence[int]) -> list[tuple[int, int, int, int, int]]:
    """The rows each sender has in common with each receiver in one micro-batch, both stages
    holding consecutive rows in rank order: ``(sender_index, receiver_index,
    offset_in_sender_rows, offset_in_receiver_rows, count)`` for every non-empty intersection, in
    the micro-batch's row order (so each row appears exactly once)."""
    if any(x < 0 for x in (*send_rows, *recv_rows)):
        raise ValueError(f"overlaps: negative rows in {list(send_rows)} -> {list(recv_rows)}")
    if sum(send_rows) != sum(recv_rows):
        raise ValueError(f"overlaps: senders hold {sum(send_rows)} rows, receivers {sum(recv_rows)}")
    out = []
    i = k = 0
    s_lo = r_lo = 0  # where sender i's and receiver k's rows begin in the micro-batch
    while i < len(send_rows) and k < len(recv_rows):
        s_hi, r_hi = s_lo + send_rows[i], r_lo + recv_rows[k]
        lo, hi = max(s_lo, r_lo), min(s_hi, r_hi)
        if hi > lo:
            out.append((i, k, lo - s_lo, lo - r_lo, hi - lo))
        if s_hi <= r_hi:
            i, s_lo = i + 1, s_hi
        else:
            k, r_lo = k + 1, r_hi
    return out


class _Works(list):
    """Started works, holding the tensors they send until the list goes (a send must not see its
    buffer reused before it completes)."""

    keep: list[torch.Tensor]


def _check_stages(fn: str, senders: Sequence[int], send_rows: Sequence[int], receivers: Sequence[int],
                  recv_rows: Sequence[int]) -> None:
    if len(senders) != len(send_rows) or len(receivers) != len(recv_rows):
        raise ValueError(f"{fn}: one row count per rank needed ({len(senders)} senders with {len(send_rows)} "
                         f"counts, {len(receivers)} receivers with {len(recv_rows)})")
    both = set(senders) & set(receivers)
    if both:  # a rank would wait on a message to itself; stages are disjoint sets of ranks
        raise ValueError(f"{fn}: ranks {sorted(both)} are in both stages; a cut joins disjoint stages")


def send_cut(x: torch.Tensor, me: int, senders: Sequence[int], send_rows: Sequence[int],
             receivers: Sequence[int], recv_rows: Sequence[int], tag: int = 0) -> list:
    """Start sending this rank's rows ``x`` of one micro-batch across a cut: each receiver gets
    the contiguous slice of rows it has in common with this rank (``overlaps``). Returns the
    started works, to ``wait_all`` before ``x`` changes ([] when there is nothing to send, or under
    ``dist.local_work_only``). Ranks are global; the stages must be disjoint.

    One ``batch_isend_irecv`` per call, so NCCL runs the sends as one group (``x`` on this
    rank's GPU; the group's first collective must involve every rank, as NCCL's batched
    point-to-point requires). ``tag`` tells apart messages between the same two ranks that are
    in flight together (gloo matches by tag; NCCL ignores it and matches in posting order): use
    one per micro-batch and direction. bool travels as uint8.
    """
    _check_stages("send_cut", senders, send_rows, receivers, recv_rows)
    mine = list(senders).index(me)
    if x.shape[0] != send_rows[mine]:
        raise ValueError(f"send_cut: rank {me} holds {x.shape[0]} rows, the cut gives it {send_rows[mine]}")
    if _d._S.dry or x.numel() == 0:
        return []
    w = _d._wire(x)
    ops = [tdist.P2POp(tdist.isend, w.narrow(0, so, cnt), receivers[k], tag=tag)
           for i, k, so, _, cnt in overlaps(send_rows, recv_rows) if i == mine]
    if not ops:
        return []
    emulate.before_comm()
    works = _Works(work for work in tdist.batch_isend_irecv(ops) if work is not None)
    works.keep = [w]
    emulate.after_comm()
    return works


def receive_cut(me: int, senders: Sequence[int], send_rows: Sequence[int], receivers: Sequence[int],
                recv_rows: Sequence[int], tail: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                tag: int = 0) -> torch.Tensor:
    """This rank's rows of one micro-batch across a cut, ``(recv_rows[me's index], *tail)``, from
    the senders that hold them (``send_cut`` with the same stages, rows and ``tag``): a fresh
    contiguous tensor on ``device``. Each sender's rows land in place in their slice, received in
    one ``batch_isend_irecv``; the call returns once they have arrived (on NCCL, once the current
    stream waits for them). No rows (or an empty ``tail``): no communication. Under
    ``dist.local_work_only`` nothing is received and the rows are zeros.
    """
    _check_stages("receive_cut", senders, send_rows, receivers, recv_rows)
    mine = list(receivers).index(me)
    out = torch.empty((recv_rows[mine], *tail), dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    if _d._S.dry:
        return out.zero_()
    w = out.view(torch.uint8) if dtype == torch.bool else out
    ops = [tdist.P2POp(tdist.irecv, w.narrow(0, ro, cnt), senders[i], tag=tag)
           for i, k, _, ro, cnt in overlaps(send_rows, recv_rows) if k == mine]
    emulate.before_comm()
    for work in tdist.batch_isend_irecv(ops):
        if work is not None:
            work.wait()
    emulate.after_comm()
    return out


def wait_all(works: Sequence) -> None:
    """Wait for the works ``send_cut`` started (waiting is not compute: the emulation clock
    restarts)."""
    if not works:
        return
    emulate.before_comm()
    for work in works:
        work.wait()
    emulate.after_comm()

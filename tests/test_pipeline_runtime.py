"""Pipeline stages at run time: how a stage's ranks split each micro-batch, the stage's order of
the global batch, which rows cross a cut between which ranks, and the exchange itself in three
gloo processes."""
from __future__ import annotations

import json
import os
import random
import time
import traceback
from datetime import timedelta
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hap.runtime import pipeline
from hap.runtime.dist import local_work_only
from hap.runtime.micro import pieces
from hap.runtime.pipeline import micro_rows, overlaps, receive_cut, send_cut, stage_positions, wait_all
from hap.runtime.shares import offset


def _check_rows(shares, m, u):
    total = sum(shares)
    chunks = pieces(total, m)
    assert len(u) == m
    for j, row in enumerate(u):
        assert len(row) == len(shares)
        assert sum(row) == chunks[j]
        for r, x in enumerate(row):
            assert x >= 0
            if total:  # the floor or the ceiling of the proportional part
                assert abs(x - Fraction(shares[r] * chunks[j], total)) < 1, (shares, m, u)
    assert [sum(row[r] for row in u) for r in range(len(shares))] == list(shares)
    for r, s in enumerate(shares):
        if s == 0:
            assert all(row[r] == 0 for row in u)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.just(0), st.integers(0, 60)), min_size=1, max_size=8), st.integers(1, 24))
def test_micro_rows_margins_and_proportion(shares, m):
    u = micro_rows(shares, m)
    _check_rows(shares, m, u)
    assert micro_rows(shares, m) == u  # deterministic


@pytest.mark.parametrize("shares,m", [((8,), 1), ((5, 3), 1), ((0, 0), 3), ((0, 4, 0), 2), ((2, 1), 7),
                                      ((1, 1, 1), 5), ((5, 3), 4), ((1, 4, 3), 4), ((3, 0, 5, 9), 6),
                                      ((1,) * 40, 16), ((997, 13, 1, 500), 33)])
def test_micro_rows_edges(shares, m):
    u = micro_rows(shares, m)
    _check_rows(shares, m, u)
    if m == 1:
        assert u == [tuple(shares)]


def test_micro_rows_more_micro_batches_than_samples_leaves_empty_ones_last():
    u = micro_rows((2, 1), 5)
    assert [sum(row) for row in u] == [1, 1, 1, 0, 0]
    assert micro_rows((0, 0), 2) == [(0, 0), (0, 0)]


def test_micro_rows_rejects_bad_input():
    with pytest.raises(ValueError):
        micro_rows((3, 2), 0)
    with pytest.raises(ValueError):
        micro_rows((3, -1), 2)


def test_columns_are_evened_out_from_a_lopsided_start():
    """The repair pass on its own: rows rounded independently (ties always to the lower rank)
    miss the column sums; moving units within rows along augmenting paths fixes them."""
    rng = random.Random(7)
    fixed = 0
    for _ in range(300):
        shares = tuple(rng.randint(0, 30) for _ in range(rng.randint(2, 7)))
        m = rng.randint(2, 12)
        total = sum(shares)
        if not total:
            continue
        chunks = pieces(total, m)
        lo = [[s * c // total for s in shares] for c in chunks]
        rem = [[s * c % total for s in shares] for c in chunks]
        hi = [[f + (1 if q else 0) for f, q in zip(a, b)] for a, b in zip(lo, rem)]
        u = []
        for j, c in enumerate(chunks):
            row = list(lo[j])
            for r in [r for r in range(len(shares)) if rem[j][r]][: c - sum(row)]:
                row[r] += 1
            u.append(row)
        fixed += [sum(row[r] for row in u) for r in range(len(shares))] != list(shares)
        pipeline._even_columns(u, lo, hi, rem, shares)
        _check_rows(shares, m, [tuple(row) for row in u])
    assert fixed > 50  # the start was off often enough to exercise the paths


STAGES = [(8,), (5, 3), (1, 4, 3), (0, 8), (2, 0, 6)]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 11])
def test_every_stage_sees_the_same_samples_in_each_micro_batch(m):
    total = 8
    chunks = pieces(total, m)
    starts = [sum(chunks[:j]) for j in range(m)]
    for shares in STAGES:
        rows = micro_rows(shares, m)
        order = stage_positions(shares, rows)
        assert sorted(order) == list(range(total))
        perm = list(range(100, 100 + total))  # a step's samples
        got = [[] for _ in range(m)]  # micro-batch j's samples, as the stage's ranks run them
        for r, s in enumerate(shares):
            mine = [perm[p] for p in order[offset(shares, r): offset(shares, r) + s]]
            done = 0
            for j in range(m):
                got[j].extend(mine[done: done + rows[j][r]])
                done += rows[j][r]
            assert done == s
        for j in range(m):
            assert got[j] == perm[starts[j]: starts[j] + chunks[j]]


def test_stage_positions_rejects_rows_that_miss_the_shares():
    with pytest.raises(ValueError):
        stage_positions((5, 3), [(4, 4)])
    with pytest.raises(ValueError):
        stage_positions((5, 3), [(8,)])


@pytest.mark.parametrize("send,recv", [((8,), (5, 3)), ((3, 5), (2, 2, 4)), ((5, 3), (8,)), ((0, 4, 0), (2, 0, 2)),
                                       ((0, 0), (0,)), ((1, 1, 1, 1), (4,)), ((2, 3, 0, 4), (0, 9, 0))])
def test_overlaps_cover_every_row_once(send, recv):
    got = overlaps(send, recv)
    seen = []
    for i, k, so, ro, cnt in got:
        assert cnt > 0
        assert 0 <= so and so + cnt <= send[i]
        assert 0 <= ro and ro + cnt <= recv[k]
        assert offset(send, i) + so == offset(recv, k) + ro  # the same rows of the micro-batch
        seen.extend(range(offset(send, i) + so, offset(send, i) + so + cnt))
    assert seen == list(range(sum(send)))


def test_overlaps_examples():
    assert overlaps((8,), (5, 3)) == [(0, 0, 0, 0, 5), (0, 1, 5, 0, 3)]
    assert overlaps((3, 5), (2, 2, 4)) == [(0, 0, 0, 0, 2), (0, 1, 2, 0, 1), (1, 1, 0, 1, 1), (1, 2, 1, 0, 4)]
    with pytest.raises(ValueError):
        overlaps((3,), (2,))


def test_without_communication():
    """Under local_work_only nothing travels: a send starts nothing, a receive gives zeros."""
    with local_work_only(0, 3):
        assert send_cut(torch.ones(6, 2), 0, [0], [6], [1, 2], [4, 2]) == []
        got = receive_cut(1, [0], [6], [1, 2], [4, 2], (2,), torch.float32, "cpu")
        assert got.shape == (4, 2) and not got.any()
    got = receive_cut(2, [0], [6], [1, 2], [6, 0], (2,), torch.float32, "cpu")  # no rows: nothing to receive
    assert got.shape == (0, 2)
    assert send_cut(torch.ones(0, 2), 1, [1, 2], [0, 6], [0], [6]) == []
    with pytest.raises(ValueError):  # a rank in both stages
        send_cut(torch.ones(6, 2), 0, [0], [6], [0, 1], [4, 2])
    with pytest.raises(ValueError):  # rows that are not this rank's
        send_cut(torch.ones(5, 2), 0, [0], [6], [1, 2], [4, 2])
    wait_all([])


# ----------------------------------------------------------------------------------------------
# three gloo processes: stage A = [0], stage B = [1, 2]
# ----------------------------------------------------------------------------------------------

def _exchange(rank):
    """Activations A -> B for two micro-batches in flight together (told apart by tag, received
    in the opposite order), then gradients B -> A; then a cut with a zero-row receiver, bool
    rows, and stage B listed in the other rank order."""
    errors = []
    a, b = [0], [1, 2]
    a_rows, b_rows = [6], [4, 2]
    xs = [torch.arange(6 * 3, dtype=torch.float32).view(6, 3) + 100 * j for j in range(2)]
    if rank == 0:
        works = [send_cut(xs[j], 0, a, a_rows, b, b_rows, tag=j) for j in range(2)]
        for w in works:
            wait_all(w)
        for j in range(2):
            g = receive_cut(0, b, b_rows, a, a_rows, (3,), torch.float32, "cpu", tag=10 + j)
            if not torch.equal(g, -xs[j]):
                errors.append(f"gradients of micro-batch {j}: {g.tolist()}")
    else:
        mine = b.index(rank)
        lo = offset(b_rows, mine)
        got = {}
        for j in (1, 0):
            got[j] = receive_cut(rank, a, a_rows, b, b_rows, (3,), torch.float32, "cpu", tag=j)
            want = xs[j][lo: lo + b_rows[mine]]
            if not torch.equal(got[j], want) or not got[j].is_contiguous():
                errors.append(f"activations of micro-batch {j}: {got[j].tolist()} != {want.tolist()}")
        works = [send_cut(-got[j], rank, b, b_rows, a, a_rows, tag=10 + j) for j in range(2)]
        for w in works:
            wait_all(w)

    # a zero-row receiver, bool rows, and stage B ordered [2, 1]
    b2, b2_rows = [2, 1], [0, 5]
    mask = torch.tensor([True, False, True, True, False]).view(5, 1)
    if rank == 0:
        w = send_cut(mask, 0, a, [5], b2, b2_rows, tag=20)
        wait_all(w)
        back = receive_cut(0, b2, b2_rows, a, [5], (1,), torch.bool, "cpu", tag=21)
        if not torch.equal(back, ~mask):
            errors.append(f"bool rows back: {back.tolist()}")
    else:
        got = receive_cut(rank, a, [5], b2, b2_rows, (1,), torch.bool, "cpu", tag=20)
        want = mask if rank == 1 else mask[:0]
        if got.dtype != torch.bool or not torch.equal(got, want):
            errors.append(f"bool rows: {got.tolist()} != {want.tolist()}")
        w = send_cut(~got, rank, b2, b2_rows, a, [5], tag=21)
        if rank == 2 and w:
            errors.append("a rank with no rows started a send")
        wait_all(w)
    return errors


def _worker(rank, world, tmp):
    import torch.distributed as dist

    errors = []
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        errors = _exchange(rank)
        dist.barrier()
    except Exception:  # noqa: BLE001 - reported to the parent test
        errors.append(traceback.format_exc())
    finally:
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(errors, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def test_exchange_across_a_cut_in_three_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    world = 3
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + 90
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    msgs = [f"ranks {hung} hung"] if hung else []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        if not path.exists():
            msgs.append(f"rank {r} wrote no results (exit code {procs[r].exitcode})")
            continue
        msgs.extend(f"rank {r}: {m}" for m in json.loads(path.read_text()))
    assert not msgs, "\n".join(msgs)

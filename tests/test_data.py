"""The data side of a program, in one process: the documented global order, each rank's
batches, empty shares, read-ahead, dataset specs at plan time, and remote files read once
through fsspec's cache."""
from __future__ import annotations

import time

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import Dataset

from hap.errors import SpecError
from hap.runtime.data import Ahead, GlobalOrder, RankBatches, fetch, loader, open_url
from hap.spec import capture_spec, load_spec
from tests.helpers import ROOT


class Indices(Dataset):
    def __len__(self):
        return 50

    def __getitem__(self, i):
        return torch.tensor([i]), torch.tensor(float(i))


def test_the_global_order_is_the_documented_one():
    order = GlobalOrder(50, 8, seed=3)
    assert order.steps_per_epoch == 6  # 50 // 8: the last 2 items of an epoch are dropped
    for step in (0, 5, 6, 13):
        epoch, k = divmod(step, 6)
        perm = torch.randperm(50, generator=torch.Generator().manual_seed(3 + epoch))
        assert torch.equal(order.indices(step), perm[k * 8:(k + 1) * 8])
        assert order.position(step) == (epoch, k)
    assert torch.equal(GlobalOrder(50, 8, 3, shuffle=False).indices(7), torch.arange(8, 16))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalOrder(5, 8, 0)


def test_each_rank_gets_its_positions_of_every_global_batch():
    order, shares = GlobalOrder(50, 8, 0), [5, 0, 3]
    per_rank = [list(RankBatches(order, r, lambda _s: shares, 2, 9)) for r in range(3)]
    for i, step in enumerate(range(2, 9)):
        whole = order.indices(step).tolist()
        assert per_rank[0][i] + per_rank[1][i] + per_rank[2][i] == whole
        assert per_rank[1][i] == []


@pytest.mark.parametrize("prefetch", [0, 2])
def test_the_loader_yields_the_rank_share_and_empty_shares_without_reading(prefetch):
    order = GlobalOrder(50, 8, 0)
    samples = [((1,), torch.int64), ((), torch.float32)]
    got = list(loader(Indices(), RankBatches(order, 0, lambda _s: [5, 3], 0, 4), None, samples, prefetch))
    assert [b[0].flatten().tolist() for b in got] == [order.indices(s)[:5].tolist() for s in range(4)]
    empty = list(loader(Indices(), RankBatches(order, 1, lambda _s: [8, 0], 0, 2), None, samples, prefetch))
    assert [(b[0].shape, b[0].dtype, b[1].shape) for b in empty] == [((0, 1), torch.int64, (0,))] * 2


def test_read_ahead_hands_over_errors():
    def broken():
        yield 1
        raise RuntimeError("the bucket is gone")

    it = Ahead(broken(), 2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bucket is gone"):
        next(it)


def test_dataset_specs_plan_from_one_collated_batch_and_bad_ones_say_why(tmp_path):
    graph = capture_spec(load_spec(ROOT / "tests/models/dataset_mlp.py"))
    inputs = [n for n in graph if n.kind == "input"]
    assert [n.meta.shape for n in inputs] == [(24, 12), (24,)]
    neither = tmp_path / "neither.py"
    neither.write_text("BATCH_SIZE = 4\ndef model():\n    pass\n")
    with pytest.raises(SpecError, match="batch or dataset"):
        load_spec(neither)
    small = tmp_path / "small.py"
    text = (ROOT / "tests/models/dataset_mlp.py").read_text()
    small.write_text(text.replace("N, D, CLASSES = 200", "N, D, CLASSES = 10"))
    with pytest.raises(SpecError, match="fewer than one global batch"):
        capture_spec(load_spec(small))


class SlowFS(LocalFileSystem):
    """Local files behind 0.2 s of latency per read: a remote bucket without a network."""

    protocol = ("slowfile",)
    reads = 0

    @classmethod
    def _strip_protocol(cls, path):
        return LocalFileSystem._strip_protocol(str(path).removeprefix("slowfile://"))

    def _slow(self):
        type(self).reads += 1
        time.sleep(0.2)

    def _open(self, *a, **kw):
        self._slow()
        return super()._open(*a, **kw)

    def get_file(self, *a, **kw):
        self._slow()
        return super().get_file(*a, **kw)

    def cat_file(self, *a, **kw):
        self._slow()
        return super().cat_file(*a, **kw)


def test_remote_files_are_read_once_then_served_from_the_local_cache(tmp_path):
    fsspec.register_implementation("slowfile", SlowFS, clobber=True)
    (tmp_path / "shard.bin").write_bytes(b"tokens " * 1000)
    url, cache = f"slowfile://{tmp_path / 'shard.bin'}", str(tmp_path / "cache")
    SlowFS.reads = 0
    t0 = time.perf_counter()
    path = fetch(url, cache=cache)
    first = time.perf_counter() - t0
    assert SlowFS.reads == 1 and first >= 0.2
    t0 = time.perf_counter()
    for _ in range(3):
        assert fetch(url, cache=cache) == path
        with open_url(url, cache=cache) as f:
            assert f.read() == b"tokens " * 1000
    assert SlowFS.reads == 1 and time.perf_counter() - t0 < 0.2  # every later read is local
    local = tmp_path / "shard.bin"
    assert fetch(f"file://{local}") == str(local)  # a local file is not copied


class _BatchSpec:
    """A ``batch(step, B)`` spec: row i of step s holds (s, i); ``rows=`` when ``by_rows``
    (``wrong`` returns other rows); ``global_rng`` draws from torch's global random state."""

    def __init__(self, by_rows: bool = False, wrong: bool = False, global_rng: bool = False) -> None:
        self.calls: list[tuple] = []
        self.wrong, self.global_rng = wrong, global_rng
        if by_rows:
            self.batch = self._batch_rows

    def _rows(self, step, lo, hi):
        if self.global_rng:
            torch.rand(1)
        x = torch.tensor([[float(step), float(i)] for i in range(lo, hi)]).reshape(-1, 2)
        return (x, torch.arange(lo, hi, dtype=torch.int64))

    def batch(self, step, batch_size):
        self.calls.append((step, None))
        return self._rows(step, 0, batch_size)

    def _batch_rows(self, step, batch_size, rows=None):
        self.calls.append((step, rows))
        if rows is None:
            return self._rows(step, 0, batch_size)
        lo, hi = rows
        return self._rows(step, lo + 1, hi + 1) if self.wrong else self._rows(step, lo, hi)


SAMPLES = [((2,), "float32"), ((), "int64")]


@pytest.mark.parametrize("by_rows", [False, True])
def test_batch_specs_are_prepared_ahead_in_a_thread_with_the_same_rows(by_rows):
    from hap.runtime.data import RankData

    spec = _BatchSpec(by_rows=by_rows)
    data = RankData(spec, 1, [5, 3], [0, 0], SAMPLES, 0, 2, 12, 4, torch.device("cpu"))

    def steps(a, b):  # the loop: a step's batch, then its gradient sync lets the thread make one more
        out = []
        for step in range(a, b):
            out.append(data.next(step))
            data.make_next()
        return out

    got = steps(2, 6)
    assert data.prepared_ahead
    time.sleep(0.2)  # the thread has prepared steps 6 and 7 under the shares [5, 3]
    assert [c[0] for c in spec.calls][-1] == 7  # two steps ahead, no more
    data.reshare([6, 2], 6 + data.lookahead - 1)  # a re-balancing decided at step 6
    got += steps(6, 12)
    for step, (x, i) in zip(range(2, 12), got):
        want = [5, 6, 7] if step < 6 + data.lookahead - 1 else [6, 7]
        assert x[:, 0].tolist() == [float(step)] * len(want) and i.tolist() == want, (step, i)
    assert len(data.waits) == 10
    # rows=: after the first step's check against the whole batch, only this rank's rows are made
    if by_rows:
        assert spec.calls[:2] == [(2, None), (2, (5, 8))] and all(r is not None for _, r in spec.calls[2:])
    else:
        assert all(r is None for _, r in spec.calls)
    data.close()


def test_a_batch_spec_whose_rows_differ_from_the_whole_batch_is_refused():
    from hap.runtime.data import BadBatch, RankData

    data = RankData(_BatchSpec(by_rows=True, wrong=True), 1, [5, 3], [0, 0], SAMPLES, 0, 0, 4, 4,
                    torch.device("cpu"))
    with pytest.raises(BadBatch, match=r"rows=\(5, 8\)\) did not return rows 5..7 of batch\(0, 8\)"):
        data.next(0)


@pytest.mark.parametrize("prefetch,global_rng", [(0, False), (4, True)])
def test_batch_specs_are_made_in_the_loop_without_prefetch_or_when_they_draw_from_the_global_rng(
        prefetch, global_rng):
    from hap.runtime.data import RankData

    data = RankData(_BatchSpec(global_rng=global_rng), 0, [5, 3], [0, 0], SAMPLES, 0, 0, 4, prefetch,
                    torch.device("cpu"))
    got = [data.next(step)[1].tolist() for step in range(4)]
    assert got == [[0, 1, 2, 3, 4]] * 4 and not data.prepared_ahead

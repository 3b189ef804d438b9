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

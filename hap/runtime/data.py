"""A rank's share of every global batch, fetched by torch's DataLoader, and remote files
read through fsspec with a local cache.

The global order (every run, under any plan and any number of ranks, sees the same global
batches; docs/data.md):

    epoch e        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + e))
    step k of e    the global batch is perm[k*B:(k+1)*B]; the last incomplete batch is dropped
    rank r         takes positions [offset_r, offset_r + share_r) of that batch

Global step ``s`` is step ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``, so a
checkpoint's step is its data position. A rank's ``DataLoader`` gets a batch sampler that
yields only that rank's indices, so it fetches only its own samples; with ``prefetch > 0``
its worker processes fetch up to ``prefetch`` batches per worker ahead of use (read-ahead),
and with ``prefetch == 0`` the training loop fetches each batch itself when it needs it.
"""
from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .shares import offset

WORKERS = 2  # worker processes per rank when reading ahead (fetching mostly waits on storage, not a core)


class GlobalOrder:
    """The documented order of a dataset of ``size`` items in global batches of ``batch``
    (``shuffle=False``: in index order every epoch, as validation reads)."""

    def __init__(self, size: int, batch: int, seed: int, shuffle: bool = True) -> None:
        if size < batch:
            raise ValueError(f"the dataset has {size} items, fewer than one global batch of {batch}; use a "
                             "smaller --batch-size when planning or a larger dataset")
        self.size, self.batch, self.seed, self.shuffle = size, batch, seed, shuffle
        self.steps_per_epoch = size // batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of global step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> torch.Tensor:
        """Dataset indices of global step ``step``'s batch, in order."""
        epoch, k = self.position(step)
        if not self.shuffle:
            return torch.arange(k * self.batch, (k + 1) * self.batch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.size, generator=g))
        return self._perm[1][k * self.batch:(k + 1) * self.batch]


class RankBatches(Sampler[list[int]]):
    """Batch sampler: this rank's positions of the global batches of steps ``start..stop-1``.
    ``shares_at(step)`` gives every rank's share at a step (shares may change between steps);
    ``positions(shares)`` (a pipeline stage's order of the batch under those shares,
    ``hap.runtime.pipeline.stage_positions``) reorders every global batch before the ranks take
    their ranges."""

    def __init__(self, order: GlobalOrder, rank: int, shares_at: Callable[[int], Sequence[int]], start: int,
                 stop: int, positions: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> None:
        self.order, self.rank, self.shares_at, self.start, self.stop = order, rank, shares_at, start, stop
        self.positions = positions

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            shares = self.shares_at(step)
            lo = offset(shares, self.rank)
            indices = self.order.indices(step)
            if self.positions is not None:
                indices = indices[self.positions(tuple(shares))]
            yield indices[lo:lo + shares[self.rank]].tolist()


def as_tuple(out: Any) -> tuple:
    """A spec's batch (``batch()``'s or a collate's): a tuple or list of tensors, or one tensor."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class _Collate:
    """The spec's collate (default: torch's ``default_collate``); an empty share becomes empty
    tensors shaped like the plan's inputs, without fetching anything."""

    def __init__(self, collate: Callable | None, empty: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.collate, self.empty = collate or default_collate, empty

    def __call__(self, samples: list[Any]) -> tuple[torch.Tensor, ...]:
        if not samples:
            return tuple(torch.empty((0, *tail), dtype=dt) for tail, dt in self.empty)
        return as_tuple(self.collate(samples))


def loader(ds: Dataset, batches: RankBatches, collate: Callable | None,
           empty: Sequence[tuple[tuple[int, ...], torch.dtype]], prefetch: int, pin: bool = False) -> DataLoader:
    """The rank's DataLoader over its batches: ``prefetch`` batches per worker read ahead in
    ``WORKERS`` worker processes, or (``prefetch == 0``) each batch fetched when it is needed.
    ``pin``: batches land in pinned host memory, so the copy to the GPU runs asynchronously."""
    if prefetch <= 0:
        return DataLoader(ds, batch_sampler=batches, collate_fn=_Collate(collate, empty), num_workers=0,
                          pin_memory=pin)
    return DataLoader(ds, batch_sampler=batches, collate_fn=_Collate(collate, empty), num_workers=WORKERS,
                      prefetch_factor=prefetch, persistent_workers=False, pin_memory=pin)


class Ahead:
    """Pull batches from ``it`` in a background thread, up to ``depth`` ahead of the training
    loop: receiving a batch from a DataLoader worker (unpickling it from shared memory) then
    overlaps the step's compute instead of adding to its wait (docs/data.md)."""

    _END = object()

    def __init__(self, it: Iterator, depth: int) -> None:
        import queue
        import threading

        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(it,), daemon=True, name="hap-data-ahead")
        self._thread.start()

    def _fill(self, it: Iterator) -> None:
        try:
            for item in it:
                if self._stop.is_set():
                    return
                self._q.put(item)
        except BaseException as e:  # noqa: BLE001  (handed to the training loop, which raises it)
            self._q.put(e)
        self._q.put(self._END)

    def close(self) -> None:
        """Stop reading ahead: what was read is dropped and the thread ends."""
        import queue

        self._stop.set()
        while self._thread.is_alive():  # a put blocked on the full queue goes through, then the thread sees the stop
            try:
                self._q.get(timeout=0.01)
            except queue.Empty:
                pass

    def __iter__(self) -> Ahead:
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


class Timed:
    """Iterate ``it`` and keep how long each ``next`` waited: the training loop's data wait."""

    def __init__(self, it: Iterator) -> None:
        self.it, self.waits = it, []

    def __iter__(self) -> Timed:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        item = next(self.it)
        self.waits.append(time.perf_counter() - t0)
        return item


class BadBatch(ValueError):
    """A batch whose tensors are not the shapes and dtypes the plan was made for."""


def check_batch(tensors: Sequence[Any], empty: Sequence[tuple[tuple[int, ...], torch.dtype]], rows: int,
                what: str) -> None:
    """Refuse a batch other than the plan's: as many tensors, each ``rows`` samples of the planned
    sample shape and dtype (the forward is specialised to them: a wrong one fails deep inside it,
    on some ranks only)."""
    if len(tensors) != len(empty) or not all(torch.is_tensor(x) for x in tensors):
        kinds = ", ".join(type(x).__name__ for x in tensors)
        raise BadBatch(f"{what} returned {len(tensors)} value(s) ({kinds}); the plan takes {len(empty)} tensor(s)")
    for i, (x, (shape, dtype)) in enumerate(zip(tensors, empty)):
        want = (rows, *shape)
        if tuple(x.shape) != want or x.dtype != dtype:
            raise BadBatch(f"{what} returned tensor {i} of shape {list(x.shape)} {str(x.dtype).removeprefix('torch.')}"
                           f", the plan was made for {list(want)} {str(dtype).removeprefix('torch.')}: every batch "
                           "must have the shapes and dtypes of the one planned with")


BATCH_AHEAD = 2  # batch(step, B) specs: the most steps a rank's thread holds made ahead of the loop


class RankData:
    """This rank's batches for steps ``start..stop-1``, from a spec's ``dataset("train")`` (each
    rank fetches only its share, read ahead by ``prefetch``) or its ``batch(step, B)``. ``waits``
    holds each step's data wait. Inputs the plan replicates (``inputs[i] is None``) are
    assembled from every rank's share.

    A ``batch`` spec is called for the whole global batch and the rank keeps its rows, or, when
    it takes ``rows=(lo, hi)``, for this rank's rows only (checked once against the whole
    batch). With ``prefetch > 0`` a thread prepares the next step while the loop waits for a
    step's gradient sync (``make_next``), unless the first call moves torch's global random state: the loop seeds that
    state before each forward (``hap.runtime.rng``), and a thread drawing from it at the same
    time would change what both draw."""

    def __init__(self, spec: Any, rank: int, shares: Sequence[int], inputs: Sequence[int | None],
                 samples: Sequence[tuple[tuple[int, ...], str]], seed: int, start: int, stop: int, prefetch: int,
                 device: torch.device, positions: Callable[[tuple[int, ...]], Sequence[int]] | None = None) -> None:
        self.spec, self.rank, self.inputs, self.device = spec, rank, inputs, device
        # a pipeline stage's order of each global batch under given shares (RankBatches); None: the batch's own
        self._order_of = positions
        self._orders: dict[tuple[int, ...], torch.Tensor] = {}
        self.schedule: list[tuple[int, tuple[int, ...]]] = [(start, tuple(shares))]  # (from step, shares)
        self.empty = [(tuple(shape), getattr(torch, dt)) for shape, dt in samples]
        self.order: GlobalOrder | None = None
        self._timed: Timed | None = None
        self._plain_waits: list[float] = []
        self._stop, self._prefetch = stop, prefetch
        self._ahead: Ahead | None = None
        self._by_rows: bool | None = None  # batch(..., rows=) gives this rank's rows (checked on first use)
        self.prepared_ahead: bool | None = None  # batch specs: whether a thread prepares the next steps
        self._pin = device.type == "cuda"  # pinned rows: the copy to the GPU runs asynchronously
        # a change of shares takes effect this many steps on: the loader has drawn the indices of
        # the steps it reads ahead under the old shares already (the batch thread starts again)
        self.lookahead = 1
        self._next_step = start  # batch specs: the step the loop takes next
        if hasattr(spec, "dataset"):
            ds = spec.dataset("train")
            self.order = GlobalOrder(len(ds), sum(shares), seed)
            batches = RankBatches(self.order, rank, self.shares_at, start, stop,
                                  self.positions if positions is not None else None)
            self.lookahead = WORKERS * prefetch + prefetch + 2 if prefetch > 0 else 1
            it = iter(loader(ds, batches, getattr(spec, "collate", None), self.empty, prefetch,
                             pin=device.type == "cuda"))
            self._timed = Timed(Ahead(it, prefetch) if prefetch > 0 else it)

    def positions(self, shares: tuple[int, ...]) -> torch.Tensor:
        """The stage's order of a global batch under ``shares`` (computed once per shares)."""
        if shares not in self._orders:
            self._orders[shares] = torch.tensor(list(self._order_of(shares)), dtype=torch.long)
        return self._orders[shares]

    def shares_at(self, step: int) -> tuple[int, ...]:
        return next(sh for s, sh in reversed(self.schedule) if s <= step)

    def reshare(self, shares: Sequence[int], from_step: int) -> None:
        """Every rank's shares from ``from_step`` on (at least ``lookahead`` steps ahead). The
        batch thread drops the steps it prepared and prepares them again under the new schedule."""
        self.schedule.append((from_step, tuple(shares)))
        if self._ahead is not None:
            self._stop_thread()
            self._ahead = self._thread_from(self._next_step)

    def _stop_thread(self) -> None:
        """End the batch thread, dropping what it prepared."""
        self._gate.release()  # a thread waiting for its turn goes on, and sees it is stopped
        self._ahead.close()

    def _thread_from(self, step: int) -> Ahead:
        """A thread making the rows of steps ``step..``, each once the loop lets it (``make_next``):
        the first at once, the next ones while the loop waits for a step's gradients, when this
        rank's core is otherwise idle (made freely, the batch took the core, and Python's lock,
        from the forward)."""
        import threading

        gate = self._gate = threading.Semaphore(1)

        def rows():
            for s in range(step, self._stop):
                gate.acquire()
                yield s, self._batch_rows(s)

        return Ahead(rows(), BATCH_AHEAD)

    def make_next(self) -> None:
        """The loop is about to wait for this step's gradient sync: the batch thread may make one more step."""
        if self._ahead is not None:
            self._gate.release()

    @property
    def waits(self) -> list[float]:
        return self._timed.waits if self._timed is not None else self._plain_waits

    def position(self, step: int) -> dict[str, int]:
        """Where step ``step`` is in the data: global step, and for a dataset its epoch and step in it."""
        if self.order is None:
            return {"step": step}
        epoch, k = self.order.position(step)
        return {"step": step, "epoch": epoch, "step_in_epoch": k}

    def _batch_rows(self, step: int) -> tuple[torch.Tensor, ...]:
        """This rank's part of ``batch(step, B)``: its rows of the inputs the plan shards, the
        whole of those it replicates."""
        shares = self.shares_at(step)
        total, lo, share = sum(shares), offset(shares, self.rank), shares[self.rank]
        if self._by_rows is None:
            self._by_rows = self._order_of is None and self._rows_agree(step, total, lo, share)
        if self._by_rows:
            out = as_tuple(self.spec.batch(step, total, rows=(lo, lo + share)))
            check_batch(out, self.empty, share, f"batch({step}, {total}, rows=({lo}, {lo + share}))")
        else:
            full = self._whole_batch(step, total)
            if self._order_of is not None:
                order = self.positions(shares)
                mine = order[lo:lo + share]
                out = tuple(x.index_select(0, mine) if d == 0 else x.index_select(0, order)
                            for x, d in zip(full, self.inputs))
            else:  # a copy of the rows, so that the global batch is freed while they wait in the queue
                out = tuple(x.narrow(0, lo, share).clone() if d == 0 and share < total else x
                            for x, d in zip(full, self.inputs))
        return tuple(x.pin_memory() for x in out) if self._pin else out

    def _whole_batch(self, step: int, total: int) -> tuple[torch.Tensor, ...]:
        """``batch(step, total)``, checked against the plan's inputs (every rank builds the same
        global batch, so every rank finds the same fault)."""
        full = as_tuple(self.spec.batch(step, total))
        check_batch(full, self.empty, total, f"batch({step}, {total})")
        return full

    def _rows_agree(self, step: int, total: int, lo: int, share: int) -> bool:
        """Whether the spec's ``batch`` takes ``rows=`` and this plan can use it (it shards every
        input); a spec whose rows differ from the whole batch's slice is refused."""
        try:
            takes = "rows" in inspect.signature(self.spec.batch).parameters
        except (TypeError, ValueError):
            takes = False
        if not takes or any(d != 0 for d in self.inputs):
            return False
        full = self._whole_batch(step, total)
        part = as_tuple(self.spec.batch(step, total, rows=(lo, lo + share)))
        if not (len(part) == len(full) and all(torch.is_tensor(p) and torch.equal(p, x.narrow(0, lo, share))
                                                for p, x in zip(part, full))):
            raise BadBatch(f"batch({step}, {total}, rows=({lo}, {lo + share})) did not return rows "
                           f"{lo}..{lo + share - 1} of batch({step}, {total}): with rows=, batch must return exactly "
                           "those rows of the global batch")
        return True

    def _prepared(self, step: int) -> tuple[torch.Tensor, ...]:
        """Step ``step``'s rows: from the thread that prepares them ahead, or made now (the first
        step decides whether a thread may, see the class docstring)."""
        if self._ahead is not None:
            got, rows = next(self._ahead)
            if got != step:
                raise RuntimeError(f"hap: the batch thread prepared step {got} for step {step}")
            return rows
        before = torch.random.get_rng_state()
        rows = self._batch_rows(step)
        if self.prepared_ahead is None:
            self.prepared_ahead = (self._prefetch > 0 and step + 1 < self._stop
                                   and torch.equal(before, torch.random.get_rng_state()))
            if self.prepared_ahead:
                self._ahead = self._thread_from(step + 1)
        return rows

    def next(self, step: int) -> list[torch.Tensor]:
        shares = self.shares_at(step)
        if self._timed is None:
            t0 = time.perf_counter()
            rows = self._prepared(step)
            self._next_step = step + 1
            self._plain_waits.append(time.perf_counter() - t0)
            return [x.to(self.device, non_blocking=self._pin) for x in rows]
        local = next(self._timed)
        check_batch(local, self.empty, shares[self.rank], f"the collate of step {step}'s rank {self.rank} share")
        return assemble(local, self.inputs, shares, self.device)

    def close(self) -> None:
        self._timed = None  # the DataLoader's workers exit with their iterator
        if self._ahead is not None:
            self._stop_thread()
            self._ahead = None


def assemble(local: Sequence[torch.Tensor], inputs: Sequence[int | None], shares: Sequence[int],
             device: torch.device) -> list[torch.Tensor]:
    """The forward's batch from this rank's share: sharded inputs as they are, replicated ones
    (``inputs[i] is None``) gathered from every rank's share."""
    from .collectives import gather_full

    cuda = device.type == "cuda"  # pinned batches: the copy overlaps what the GPU still has queued
    return [x.to(device, non_blocking=cuda) if d == 0 else gather_full(x.to(device, non_blocking=cuda), "S", 0, shares)
            for x, d in zip(local, inputs)]


def val_batches(spec: Any, rank: int, shares: Sequence[int], inputs: Sequence[int | None], samples,
                device: torch.device, max_batches: int) -> Iterator[list[torch.Tensor]]:
    """This rank's share of the first ``max_batches`` global batches of ``dataset("val")``, in
    index order (no read-ahead: validation is occasional)."""
    ds = spec.dataset("val")
    order = GlobalOrder(len(ds), sum(shares), 0, shuffle=False)
    n = min(max_batches, order.steps_per_epoch)
    empty = [(tuple(shape), getattr(torch, dt)) for shape, dt in samples]
    for batch in loader(ds, RankBatches(order, rank, lambda _step: shares, 0, n), getattr(spec, "collate", None),
                        empty, 0):
        yield assemble(batch, inputs, shares, device)


# ---------------------------------------------------------------------------------------
# remote files
# ---------------------------------------------------------------------------------------
def cache_dir() -> str:
    root = os.environ.get("HAP_DATA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hap", "data")
    return root


def open_url(url: str, mode: str = "rb", cache: str | None = None, **storage_options: Any):
    """Open a dataset file by URL (``s3://``, ``gs://``, ``https://``, ``file://``, a path, or any
    fsspec protocol) through fsspec's whole-file cache: the first open downloads it to ``cache``
    (default ``$HAP_DATA_CACHE`` or ``~/.cache/hap/data``), later opens, by any process on this
    machine, read the local copy. Remote protocols need their fsspec driver (``s3fs``, ``gcsfs``;
    ``https`` needs ``aiohttp``)."""
    import fsspec

    if "://" not in url or url.startswith("file://"):
        return fsspec.open(url, mode).open()  # already local: nothing to cache
    protocol = url.split("://", 1)[0]
    return fsspec.open(f"filecache::{url}", mode, filecache={"cache_storage": cache or cache_dir()},
                       **{protocol: storage_options} if storage_options else {}).open()


def fetch(url: str, cache: str | None = None, **storage_options: Any) -> str:
    """A local path holding ``url``'s bytes, downloaded once through the cache of ``open_url``."""
    import fsspec

    if "://" not in url or url.startswith("file://"):
        return url.removeprefix("file://")
    protocol = url.split("://", 1)[0]
    return fsspec.open_local(f"filecache::{url}", filecache={"cache_storage": cache or cache_dir()},
                             **{protocol: storage_options} if storage_options else {})

"""Process-group setup, backend choice, and the few raw communication primitives.

Everything backend-specific lives here: the rest of `hap.runtime` calls `_all_gather_equal`,
`_reduce_scatter_equal`, `_all_to_all`, `_all_reduce`, `_broadcast` and never touches
`torch.distributed` directly for communication. Each primitive first flushes the rank's emulated
compute delay (see `emulate.py`), then communicates, then starts the next segment.

Single-process mode (no WORLD_SIZE, or WORLD_SIZE=1): no process group is created and every
collective is the identity / a local op.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from . import emulate
from .host_memory import keep_freed_memory

GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass
class _State:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device | None = None
    owns_group: bool = False  # we called init_process_group (so shutdown destroys it)
    initialized: bool = False  # init() was called
    rs_fallback: bool = False  # backend lacks reduce_scatter_tensor: all_reduce + slice instead
    dry: bool = False  # local_work_only(): the primitives send nothing (plan-time timing)
    store: Any = None  # the rendezvous store of this attempt, under torchrun (see leave())
    # a pipeline stage (enter_stage): the collectives run within its group, and rank/world are
    # this rank's place in the stage; every_world is the whole job's size (None group: the job's)
    group: Any = None
    members: tuple[int, ...] = ()  # the stage's global ranks
    every_world: int = 1


_S = _State()


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"hap.runtime: environment variable {name}={v!r} is not an integer") from None


def init(backend: str | None = None, gpu: int | None = None) -> tuple[int, int]:
    """Join the SPMD group started by torchrun; returns (rank, world_size).

    Reads RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT through the env://
    rendezvous). Without WORLD_SIZE, or with WORLD_SIZE=1, runs as one process and creates no
    process group. `backend=None` picks "nccl" when CUDA is available, else "gloo". If a process
    group already exists (a test harness or the user made it), it is adopted as is. The host
    allocator keeps freed memory from here on (``host_memory.keep_freed_memory``). ``gpu`` is the
    CUDA device index to use (``checks.planned_gpu``); by default LOCAL_RANK's.
    """
    keep_freed_memory()
    if dist.is_available() and dist.is_initialized():
        _S.rank, _S.world = dist.get_rank(), dist.get_world_size()
        _S.local_rank = _env_int("LOCAL_RANK", _S.rank)
        _S.backend = str(dist.get_backend())
        _S.owns_group = False
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank_ = _env_int("RANK", 0)
        # a launcher that sets no LOCAL_RANK: ranks fill each node's GPUs in order
        fallback = rank_ % torch.cuda.device_count() if torch.cuda.is_available() and backend != "gloo" else rank_
        _S.local_rank = _env_int("LOCAL_RANK", fallback)
        if world <= 1:
            _S.rank, _S.world, _S.backend, _S.owns_group = 0, 1, None, False
        else:
            if not dist.is_available():
                raise RuntimeError("hap.runtime: torch.distributed is not available in this torch build")
            if not 0 <= rank_ < world:
                raise ValueError(f"hap.runtime: RANK={rank_} is outside 0..WORLD_SIZE-1={world - 1}")
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(_S.local_rank if gpu is None else gpu)
            store = _S.store = _attempt_store(rank_, world)
            # longer than a checkpoint write, during which the other ranks wait in a collective
            if store is None:
                dist.init_process_group(backend=backend, init_method="env://", rank=rank_, world_size=world,
                                        timeout=GROUP_TIMEOUT)
            else:
                dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=world,
                                        timeout=GROUP_TIMEOUT)
            _S.rank, _S.world, _S.backend, _S.owns_group = rank_, world, backend, True
    use_cuda = _S.backend == "nccl" if _S.world > 1 else (backend != "gloo" and torch.cuda.is_available())
    if use_cuda:
        _S.device = torch.device("cuda", _S.local_rank if gpu is None else gpu)
        torch.cuda.set_device(_S.device)
    else:
        _S.device = torch.device("cpu")
    _S.initialized = True
    _S.rs_fallback = False
    _S.every_world, _S.group, _S.members = _S.world, None, ()
    return _S.rank, _S.world


def _attempt_store(rank_: int, world: int):
    """Under torchrun, a store whose keys are private to this restart attempt.

    torchrun keeps one agent store across ``--max-restarts`` restarts; a restarted rank can
    otherwise read the address a dead rank of the previous attempt published and fail to
    connect ("Gloo connectFullMesh failed ... Connection refused"). None outside torchrun.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if attempt is None or not addr or not port:
        return None
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, int(port), world, is_master=(not agent_hosts and rank_ == 0),
                          timeout=timedelta(minutes=10), multi_tenant=not agent_hosts)
    return dist.PrefixStore(f"hap/attempt_{attempt}", store)


def rank() -> int:
    return _S.rank


def world_size() -> int:
    return _S.world


def local_rank() -> int:
    return _S.local_rank


def device() -> torch.device:
    """cuda:LOCAL_RANK on a CUDA run, else cpu."""
    if _S.device is not None:
        return _S.device
    if torch.cuda.is_available():
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return torch.device("cpu")


def peak_memory_bytes(dev: torch.device) -> int:
    """This process's peak memory so far: the CUDA caching allocator's peak on a GPU, the peak
    resident set (VmHWM) on CPU, where the model's tensors live in the process's own memory."""
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return _proc_status_bytes("VmHWM")


def memory_bytes_now(dev: torch.device) -> int:
    """This process's memory now, as ``peak_memory_bytes`` counts it (allocated on a GPU, VmRSS on CPU)."""
    if dev.type == "cuda":
        return int(torch.cuda.memory_allocated(dev))
    return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # the peak, in kB on Linux


@contextlib.contextmanager
def local_work_only(rank_: int, world: int):
    """Act as rank ``rank_`` of ``world`` without a process group: every collective does its local
    work (packing, unpacking, autograd) but the raw primitives send nothing and leave their outputs
    as they are. The planner times a collective's local work this way (``hap.optimer``); nothing
    else may use it."""
    if _S.world > 1 or _S.dry:
        raise RuntimeError("hap.runtime.local_work_only: a process group is active")
    _S.rank, _S.world, _S.dry = rank_, world, True
    try:
        yield
    finally:
        _S.rank, _S.world, _S.dry = 0, 1, False


def is_distributed() -> bool:
    """True when collectives really communicate (world size > 1)."""
    return _S.world > 1


def enter_stage(stages: Sequence[Sequence[int]]) -> int:
    """Join this rank's pipeline stage: ``stages`` lists every stage's global ranks (each rank in
    one). Every rank makes every stage's group, in order (torch.distributed requires all ranks
    to call ``new_group`` alike); from here on the collectives run within this rank's stage and
    ``rank()`` / ``world_size()`` are its place in it. Returns the stage's index. Whatever spans
    stages (the cut's point-to-point sends, ``_all_reduce(everywhere=True)``) names global ranks."""
    me = _S.rank
    mine = next(i for i, ranks in enumerate(stages) if me in ranks)
    if len(stages) == 1:
        return mine
    made = [new_group(ranks) for ranks in stages]
    _S.group, _S.members = made[mine], tuple(stages[mine])
    _S.rank, _S.world = _S.members.index(me), len(_S.members)
    return mine


def new_group(ranks: Sequence[int]) -> Any:
    """A process group of global ``ranks`` (every rank of the job calls this alike, in order)."""
    return dist.new_group(list(ranks)) if _S.every_world > 1 else None


def global_rank() -> int:
    """This rank in the whole job (``rank()`` is its place in its pipeline stage)."""
    return _S.members[_S.rank] if _S.members else _S.rank


def shutdown() -> None:
    """Orderly teardown: barrier, then destroy the process group. Safe to call twice.

    Destroying the group explicitly (after every rank reached the barrier) is what avoids gloo's
    "terminate called without an active exception" abort at interpreter exit.
    """
    if _S.every_world > 1 and _S.owns_group and dist.is_initialized():
        try:
            if _S.backend == "nccl":
                dist.barrier(device_ids=[_S.local_rank])
            else:
                dist.barrier()
        finally:
            dist.destroy_process_group()
    _S.owns_group = False
    _S.world, _S.rank, _S.backend, _S.every_world, _S.group, _S.members = 1, 0, None, 1, None, ()
    _S.initialized = False


def leave(code: int = 0) -> NoReturn:
    """End this rank's process once every rank is done communicating.

    gloo can abort a rank ("terminate called without an active exception") while its process
    group is destroyed or its threads are torn down at interpreter exit and peers tear down at
    the same moment; a rank that aborts there fails a job that has trained, and under
    ``--nnodes 2`` the other agent then waits out its exit barrier. So every rank passes a
    barrier (no collective is in flight anywhere after it), checks in at the rendezvous store
    (not gloo) until all have, and leaves without running the process group's destructors.
    Output is flushed first; files the program wrote are closed already.
    """
    if _S.every_world > 1 and _S.owns_group and dist.is_initialized():
        with contextlib.suppress(Exception):  # leaving anyway: the other ranks' exit says the rest
            if _S.backend == "nccl":
                dist.barrier(device_ids=[_S.local_rank])
            else:
                dist.barrier()
            if _S.store is not None:
                _S.store.add("left", 1)
                deadline = time.monotonic() + 60.0
                while _S.store.add("left", 0) < _S.every_world and time.monotonic() < deadline:
                    time.sleep(0.01)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@atexit.register
def _atexit_destroy() -> None:  # a program that forgot shutdown() still exits cleanly
    if _S.owns_group and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # best effort at exit
            dist.destroy_process_group()
        _S.owns_group = False


# ----------------------------------------------------------------------------------------------
# Raw primitives (no autograd). Inputs must be contiguous; outputs are preallocated by callers.
# ----------------------------------------------------------------------------------------------

def _wire(t: torch.Tensor) -> torch.Tensor:
    """The tensor as sent on the wire: contiguous; bool travels as uint8."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


_ag_fn = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_rs_fn = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


def _all_gather_equal(out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
    """out (world*k, ...) <- concat over ranks of inp (k, ...). Equal sizes on every rank. With
    ``async_op`` (a contiguous ``out``), the started work, to ``_wait`` before reading ``out``."""
    if _S.dry:
        return None
    emulate.before_comm()
    o, i = _wire(out), _wire(inp)
    work = None
    if _ag_fn is not None:
        work = _ag_fn(o, i, group=_S.group, async_op=async_op)
    else:  # very old torch: list form
        work = dist.all_gather(list(o.chunk(_S.world)), i, group=_S.group, async_op=async_op)
    if not async_op and not out.is_contiguous():
        out.copy_(o.view(torch.bool) if out.dtype == torch.bool else o)
    emulate.after_comm()
    return work if async_op else None


def _reduce_scatter_equal(out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
    """out (k, ...) <- rank's k-row block of the sum over ranks of inp (world*k, ...). With
    ``async_op``, the started work (None where it ran at once), to ``_wait`` before reading ``out``."""
    if _S.dry:
        return None
    emulate.before_comm()
    if _rs_fn is not None and not _S.rs_fallback:
        try:
            work = _rs_fn(out, inp.contiguous(), group=_S.group, async_op=async_op)
            emulate.after_comm()
            return work if async_op else None
        except (RuntimeError, NotImplementedError) as e:  # gloo before torch 2.x lacks it
            msg = str(e).lower()
            if "support" not in msg and "implemented" not in msg:
                raise
            _S.rs_fallback = True
    buf = inp.contiguous().clone()
    dist.all_reduce(buf, group=_S.group)
    k = out.shape[0]
    out.copy_(buf.narrow(0, _S.rank * k, k))
    emulate.after_comm()
    return None


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
                in_splits: list[int] | None, async_op: bool = False):
    """all_to_all_single along dim 0 (None splits = equal). With ``async_op`` (a contiguous
    ``out``), the started work, to ``_wait`` before reading ``out``."""
    if _S.dry:
        return None
    emulate.before_comm()
    o, i = _wire(out), _wire(inp)
    work = dist.all_to_all_single(o, i, out_splits, in_splits, group=_S.group, async_op=async_op)
    if not async_op and not out.is_contiguous():
        out.copy_(o.view(torch.bool) if out.dtype == torch.bool else o)
    emulate.after_comm()
    return work if async_op else None


def _all_reduce_async(t: torch.Tensor):
    """Start an in-place sum over ranks of a contiguous tensor; ``_wait`` the returned work."""
    if _S.dry:
        return None
    emulate.before_comm()
    work = dist.all_reduce(t, group=_S.group, async_op=True)
    emulate.after_comm()
    return work


def _wait(work) -> None:
    """Wait for an async collective (waiting is not compute: the emulation clock restarts)."""
    if work is None:  # local_work_only(), or a collective that ran at once
        return
    emulate.before_comm()
    work.wait()
    emulate.after_comm()


def barrier(everywhere: bool = False) -> None:
    """Every rank of this rank's stage (with ``everywhere``: of the whole job) waits here for the
    others (nothing in a single process)."""
    if _S.dry or not (_S.every_world > 1 if everywhere else is_distributed()):
        return
    group = None if everywhere else _S.group
    if _S.backend == "nccl":
        dist.barrier(group=group, device_ids=[_S.local_rank])
    else:
        dist.barrier(group=group)


def _all_reduce(t: torch.Tensor, op: str = "sum", everywhere: bool = False, group: Any = None) -> None:
    """In-place sum (or ``op="max"``) of a contiguous tensor over the ranks of this rank's stage,
    with ``everywhere`` of the whole job, or of ``group`` (``new_group``) where one is given; a
    host tensor on an NCCL group (which reduces device memory only) travels through this rank's GPU."""
    if _S.dry or (group is None and not (_S.every_world > 1 if everywhere else is_distributed())):
        return
    emulate.before_comm()
    red = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    if group is None:  # the stage's group, or None: torch.distributed's whole job
        group = None if everywhere else _S.group
    if _S.backend == "nccl" and t.device.type == "cpu":
        on_gpu = t.to(device())
        dist.all_reduce(on_gpu, op=red, group=group)
        t.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(t, op=red, group=group)
    emulate.after_comm()


def _broadcast(t: torch.Tensor, src: int) -> None:
    if _S.dry:
        return
    emulate.before_comm()
    dist.broadcast(t, _S.members[src] if _S.members else src, group=_S.group)  # src: a rank of the stage
    emulate.after_comm()

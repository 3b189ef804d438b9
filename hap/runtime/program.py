"""The fixed part of every emitted ``train.py``: its command line, start-up checks, the
training step and loop, checkpoints, re-balancing and logging. ``train.py`` holds what its plan
decides, as one ``hap.runtime.Layout`` (``LAYOUT``) and the forward over local shards
``forward(layout, params, buffers, batch) -> this rank's addend of the loss``, and calls
``main(LAYOUT, forward, __file__)``. The layout's fields are documented in
``hap.runtime.layout``; the runtime places it on a rank once the process group is up and derives
a new one when the shares change (a re-balancing) or per micro-batch, never writing into the
program's module.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import importlib.util
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch

from . import checkpoint as ckpt
from . import initial, micro, optim
from .checks import Refused, backend_for, cuda_missing, device_mismatch, placement_mismatch, planned_gpu
from .collectives import deferred_grads, gather_full, sum_scalar
from .data import BadBatch, RankData, val_batches
from .dist import (
    _all_reduce,
    barrier,
    device,
    init,
    is_distributed,
    leave,
    local_rank,
    memory_bytes_now,
    peak_memory_bytes,
)
from .emulate import comm_seconds, end_segment, set_emulation, undilated
from .grad_sync import GradSync
from .layout import FORMAT, Layout, offset
from .logger import Phases, RunLog, tensorboard_writer
from .precision import Precision
from .pretrained import Pretrained, PretrainedError
from .rng import seed_step
from .sharded_ops import count_deferred
from .shares import Rebalancer, split_lengths


def parse_args(argv: list[str] | None = None, default_optimizer: str = "sgd") -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="hap-emitted SPMD training program")
    ap.add_argument("--steps", type=int, default=10, help="train until this many steps are done")
    ap.add_argument("--lr", type=float, default=0.01, help="the peak learning rate (default 0.01)")
    optim.add_arguments(ap, default_optimizer)
    ap.add_argument("--seed", type=int, default=0, help="the seed of the model's initialisation and of the data "
                                                         "order (default 0)")
    ap.add_argument("--init", default=None, metavar="DIR",
                    help="read the model's initial state from DIR (written by --write-init with the same --seed); "
                         "default: each node's first process writes one to its temporary directory")
    ap.add_argument("--write-init", default=None, metavar="DIR",
                    help="write the model's initial state for --seed to DIR and exit (one process, without "
                         "torchrun): model() built once, as one device builds it")
    ap.add_argument("--log-json", default=None, help="rank 0 writes losses and step times here")
    ap.add_argument("--dump-params", default=None, help="rank 0 saves the full state_dict after the last step")
    ap.add_argument("--emulate", action="store_true",
                    help="dilate each rank's compute by its planned slowdown (CPU emulation)")
    ap.add_argument("--save", default=None, metavar="DIR", help="write checkpoints to DIR")
    ap.add_argument("--save-every", type=int, default=0, metavar="K", help="checkpoint every K steps (and at the end)")
    ap.add_argument("--resume", default=None, metavar="DIR", help="continue from the latest checkpoint in DIR")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="load a checkpoint another user wrote: its DCP .metadata is a Python pickle, and loading it "
                         "runs whatever code it holds (default: only your own checkpoints)")
    ap.add_argument("--reset-optimizer", action="store_true",
                    help="with --resume: take the checkpoint's weights and start the optimizer's state afresh (to "
                         "resume under another --optimizer)")
    ap.add_argument("--prefetch", type=int, default=4, metavar="N",
                    help="dataset specs: batches each of the rank's data workers reads ahead; batch(step, B) specs: "
                         "any N > 0 makes the next step's batch in a thread while the loop waits for the gradient "
                         "sync (0: fetch each batch when it is needed, in the training loop)")
    ap.add_argument("--eval-every", type=int, default=0, metavar="K",
                    help="dataset specs: report the validation loss every K steps (and after the last)")
    ap.add_argument("--eval-batches", type=int, default=8, metavar="N",
                    help="global batches of the val split each validation reads (default 8)")
    ap.add_argument("--micro-batches", type=int, default=None, metavar="K",
                    help="each rank runs its share of a step in K micro-batches, accumulating gradients, one "
                         "optimizer step per global batch (default: the plan's micro-batches, chosen to fit memory)")
    ap.add_argument("--tensorboard", default=None, metavar="DIR",
                    help="rank 0 writes each step's loss, lr, grad-norm and throughput as TensorBoard event files "
                         "to DIR (pip install 'hap[tensorboard]')")
    ap.add_argument("--no-rebalance", action="store_true",
                    help="keep the plan's shares (default: move samples to ranks measured faster)")
    ap.add_argument("--slowdown-at", action="append", default=[], metavar="STEP:RANK:FACTOR",
                    help="with --emulate: from STEP on, RANK computes FACTOR times slower (repeatable)")
    return ap.parse_args(argv)


def stop(message: str, code: int = 2) -> NoReturn:
    """Print ``message`` and end this rank at once: a user's mistake, no traceback. It enters no
    collective: a rank that stops alone must not wait for peers that never join it (under
    torchrun the agent then ends the other ranks). Where every rank can learn of a failure,
    ``agree_or_stop`` stops them all together, each with the message."""
    print(f"train.py: {message}", file=sys.stderr, flush=True)
    run_stop_hooks()
    sys.stdout.flush()
    os._exit(code)


def run_stop_hooks() -> None:
    for hook in when_stopping:
        with contextlib.suppress(Exception):  # stopping anyway
            hook()


when_stopping: list = []  # what a stopping rank still does (rank 0 releases its --save lock on a last attempt)


@dataclass(frozen=True)
class Program:
    """An emitted program: its layout (placed on this rank once ``start`` has joined the group),
    its forward and its train.py file."""
    layout: Layout
    forward: Callable
    file: str


def load_spec(program: Program) -> ModuleType:
    """The model spec, found relative to train.py (the same layout on every node)."""
    path = os.path.join(os.path.dirname(program.file), program.layout.spec)
    if not os.path.isfile(path):
        raise Refused(f"the model spec {path} is missing on this node; copy it there at the same place relative "
                      f"to train.py (spec={program.layout.spec!r})")
    spec = importlib.util.spec_from_file_location("hap_user_spec", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the user's file: say where it failed, on every rank
        raise Refused(f"the model spec {path} failed to import: {type(e).__name__}: {e}") from e
    return mod


def build_model(spec: ModuleType, seed: int, meta: bool = False) -> torch.nn.Module:
    """The spec's single-device model, initialised as one device would with ``seed``; with
    ``meta``, its shapes only (on the meta device: no memory), or built whole where ``model()``
    cannot run on meta (``hap.runtime.initial``)."""
    torch.manual_seed(seed)
    if meta:
        try:
            with torch.device("meta"):
                model = spec.model()
            if on_meta(model):
                return model
        except Exception:  # noqa: BLE001  (a constructor that needs real tensors: built whole below)
            pass
        print("train.py: model() does not build on the meta device, so every rank builds it whole and keeps its "
              "shards", flush=True)
        torch.manual_seed(seed)
    try:
        return spec.model()
    except Exception as e:
        raise Refused(f"the model spec's model() failed: {type(e).__name__}: {e}") from e


def on_meta(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds shapes only (``build_model`` with ``meta``): every tensor on meta."""
    return all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def check_shapes(layout: Layout, model: torch.nn.Module) -> None:
    """Refuse a model other than the planned one (another spec, or the same spec under other
    settings on this node)."""
    sd = {**dict(model.named_buffers()), **model.state_dict()}
    wrong = [f"{k} is {list(sd[k].shape) if k in sd else 'missing'}, the plan has {list(shape)}"
             for k, shape in layout.shapes.items() if k not in sd or tuple(sd[k].shape) != shape]
    if wrong:
        raise Refused("the spec built a different model than the one planned (" + "; ".join(wrong[:3]) +
                      "); run with the same spec and environment (e.g. its HAP_* size variables) or re-plan")


def local_state(layout: Layout, model: torch.nn.Module, initial: Pretrained | None = None,
                pretrained: Pretrained | None = None):
    """This rank's shards of the single-device model's parameters and buffers: sliced from ``model``
    where it was built whole, else read from the ``initial`` state (``hap.runtime.initial``), each
    rank only its slices; ``pretrained`` weights (and the buffers its checkpoint holds) replace the
    initial ones. A meta model without either gets empty tensors, for a checkpoint to fill."""
    sd = {**dict(model.named_buffers()), **model.state_dict()}  # non-persistent buffers too

    def source(keys: tuple[str, ...]) -> Pretrained | None:
        if pretrained is not None and any(k.startswith(pretrained.prefix) and k[len(pretrained.prefix):] in
                                          pretrained.keys() for k in keys):
            return pretrained
        return initial

    params = {}
    for name, p in layout.params.items():
        full, reader = sd[p.keys[0]], source(p.keys)
        start = offset(p.lengths, layout.rank) if p.sharded else 0
        if reader is not None and (reader is pretrained or full.is_meta):
            local = reader.read(p.keys, layout.shapes[p.keys[0]], full.dtype, p.dim, start,
                                p.lengths[layout.rank] if p.sharded else 0)
        elif full.is_meta:
            local = torch.empty(p.local(full, layout.rank).shape, dtype=full.dtype)
        else:
            local = p.local(full.detach(), layout.rank)
        params[name] = torch.nn.Parameter(local.clone().to(layout.device))
    buffers = {}
    for name, key in layout.buffers.items():
        value, reader = sd[key].detach(), source((key,))
        if reader is not None and (reader is pretrained or value.is_meta):
            value = reader.read((key,), tuple(value.shape), value.dtype, None, 0, 0)
        elif value.is_meta:
            value = torch.empty(value.shape, dtype=value.dtype)
        buffers[name] = value.clone().to(layout.device)
    return params, buffers


def initial_state(program: Program, args: argparse.Namespace, model: torch.nn.Module) -> tuple[Pretrained | None,
                                                                                               Path | None]:
    """Where this rank reads the model's initial values (``hap.runtime.initial``): ``--init DIR``, or
    a directory the node's first process writes now (returned second, to remove once read). None
    where the model was built whole."""
    if not on_meta(model):
        return None, None
    layout = program.layout
    if args.init:
        initial.check(args.init, args.seed, layout.plan_digest)
        return Pretrained(args.init), None
    directory = initial.node_directory(args.seed)
    wrong = None
    if local_rank() == 0:
        # gone however this rank ends: a stop (leave() skips atexit), a crash, or the normal path
        when_stopping.append(lambda: shutil.rmtree(directory, ignore_errors=True))
        atexit.register(shutil.rmtree, directory, True)
        try:
            initial.write_in_child(program.file, directory, args.seed)
        except initial.InitError as e:
            wrong = str(e)
    agree_or_stop(program, wrong)  # the node's state is written (or every rank stops)
    return Pretrained(directory), directory


def rank_state(program: Program, layout: Layout, args: argparse.Namespace, spec: ModuleType,
               model: torch.nn.Module, ck: dict[str, Any] | None) -> tuple[dict, dict, Pretrained | None]:
    """This rank's parameters and buffers (``layout``'s) at the start, and the PRETRAINED weights
    read: its slices of the initial state (``--init``, or the one its node's first process writes
    now, removed once every rank of the node has read it) or of the spec's PRETRAINED weights;
    empty tensors where the run resumes from ``ck``, which ``resume`` reads. Every rank of
    ``program`` (the job) agrees first, and waits at the node's removal."""
    made = None
    try:
        pretrained = open_pretrained(spec) if ck is None else None  # a resumed run reads its checkpoint
        start_state, made = initial_state(program, args, model) if ck is None else (None, None)
        params, buffers = local_state(layout, model, start_state, pretrained)
        wrong = None
    except (PretrainedError, initial.InitError) as e:
        wrong = str(e)
    agree_or_stop(program, wrong)
    start_state = None  # its memory map closed: the pages it read leave this rank's memory
    if made is not None:
        barrier()  # every rank of the node has read its slices
        if local_rank() == 0:
            shutil.rmtree(made, ignore_errors=True)
    return params, buffers, pretrained


def write_init(program: Program, args: argparse.Namespace) -> None:
    """``train.py --write-init DIR``: the model's initial state for ``--seed``, for ``--init DIR``."""
    try:
        spec = load_spec(program)
        model = build_model(spec, args.seed)
        check_shapes(program.layout, model)
        size = initial.write(model, args.write_init, args.seed, program.layout.plan_digest)
    except (Refused, OSError) as e:
        stop(f"--write-init {args.write_init}: {e}")
    print(f"wrote {args.write_init}: the initial state of --seed {args.seed} ({size / 2**20:.1f} MiB); run "
          f"torchrun ... train.py --init {args.write_init} --seed {args.seed}", flush=True)


def open_pretrained(spec: ModuleType) -> Pretrained | None:
    """The spec's PRETRAINED checkpoint (None: training from scratch)."""
    directory = getattr(spec, "PRETRAINED", None)
    return Pretrained(directory, getattr(spec, "PRETRAINED_PREFIX", "")) if directory else None


def full_state_dict(layout: Layout, model: torch.nn.Module, params, buffers) -> dict[str, torch.Tensor]:
    """The consolidated state_dict, under the single-device model's keys, on rank 0 (empty on the
    others). Every rank takes part in each parameter's gather, one parameter at a time, and only
    rank 0 keeps it: no other rank ever holds the whole model."""
    out = {}
    for name, p in layout.params.items():
        local = params[name].detach()
        full = gather_full(local, "S", p.dim, p.lengths) if p.sharded else local
        if layout.rank == 0:
            for k in p.keys:
                out[k] = full.cpu().clone()
        del full
    if layout.rank == 0:
        for name, key in layout.buffers.items():
            out[key] = buffers[name].cpu()
    return {k: out[k] for k in model.state_dict() if k in out}


def job_id() -> str:
    """What the attempts of one torchrun job share (its rendezvous run id), and nothing else does."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or f"pid{os.getpid()}"


def last_attempt(restarts: int) -> bool:
    return restarts >= int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)


def from_rank0(layout: Layout, values: list[float]) -> list[int]:
    """Rank 0's ``values`` on every rank (one all-reduce; other ranks contribute zeros)."""
    got = torch.tensor(values if layout.rank == 0 else [0.0] * len(values), dtype=torch.float64,
                       device=layout.device)
    _all_reduce(got)
    return [int(x) for x in got.cpu().tolist()]


def open_save(program: Program, args: argparse.Namespace, restarts: int) -> str:
    """Rank 0 takes the ``--save`` directory's lock for this run: a directory another live job
    writes is refused, and so is one holding another run's checkpoints when this run does not
    resume. Every rank then checks that it sees rank 0's lock: a directory that is not one shared
    storage on every node would leave other nodes' shards out of every checkpoint. Returns the
    run id, the same on every rank (a restarted attempt continues its run's)."""
    layout = program.layout
    run_id, nonce, wrong = ckpt.new_id(), ckpt.new_id(), None
    if layout.rank == 0 and args.save:
        try:
            rid, note = ckpt.lock(args.save, job_id(), restarts, f"{run_id:012x}", nonce)
            run_id = int(rid, 16)
            if note:
                print(f"train.py: {note}", flush=True)
            others = ckpt.foreign(args.save, rid)
            if others and not args.resume:
                ckpt.unlock(args.save, rid)
                names = ", ".join(c.name for c in others[-3:])
                raise ckpt.CheckpointError(
                    f"--save {args.save} already holds checkpoints of another run ({names}); continue that run with "
                    f"--resume {args.save} --save {args.save}, or save this run elsewhere (--save NEWDIR)")
            ckpt.remove_temporaries(args.save)
        except (ckpt.CheckpointError, OSError) as e:
            wrong = f"--save {args.save}: {e}" if isinstance(e, OSError) else str(e)
    agree_or_stop(program, wrong)
    run_id, nonce = from_rank0(layout, [float(run_id), float(nonce)])
    if args.save:  # a restarted attempt needs the lock to continue its run
        when_stopping.append(lambda: layout.rank == 0 and last_attempt(restarts)
                             and ckpt.unlock(args.save, f"{run_id:012x}"))
    if args.save and layout.world_size > 1:
        seen = ckpt.lock_nonce(args.save)
        agree_or_stop(program, None if seen == nonce else (
            f"rank {layout.rank} (node {layout.places[layout.rank][0]}) does not see rank 0's "
            f"{os.path.join(args.save, ckpt.LOCK)}: --save must be one directory on storage every node shares "
            "(NFS, Lustre, a mounted bucket), at the same path on every node"))
    return f"{run_id:012x}"


def resume_point(program: Program, args: argparse.Namespace, run_id: str, restarts: int) -> dict[str, Any] | None:
    """Rank 0 decides whether and from which checkpoint to resume and tells every rank (one
    all-reduce), so ranks never start at different steps; every rank then reads that step's meta.
    A restarted attempt continues from its run's newest complete checkpoint in ``--save``, before
    an older ``--resume``; one whose run stopped for good (``checkpoint.mark_stopped``) stops."""
    where, step, wrong = 0, -1, None  # where: 1 the run's --save, 2 --resume
    if program.layout.rank == 0:
        try:
            where, step = _choose_resume(args, run_id, restarts)
        except ckpt.CheckpointError as e:
            wrong = str(e)
    agree_or_stop(program, wrong)
    where, step = from_rank0(program.layout, [float(where), float(step)])
    if where == 0:
        return None
    try:
        return ckpt.read_meta(_step_dir(args, where, step))
    except ckpt.CheckpointError as e:  # this rank cannot read what rank 0 read
        stop(f"rank {program.layout.rank}: {e}")


def _choose_resume(args: argparse.Namespace, run_id: str, restarts: int) -> tuple[int, int]:
    """Rank 0's choice for ``resume_point``: (1 the run's --save / 2 --resume / 0 none, step)."""
    where, step, note = 0, -1, None
    if restarts > 0 and args.save:
        marker = ckpt.stopped(args.save, run_id)
        if marker is not None:
            raise ckpt.CheckpointError(
                f"an earlier attempt of this run stopped at step {marker['step']} ({marker['reason']}), and "
                "a restart would train into it again: stopping for good. Fix the cause (a lower --lr, "
                f"--clip-grad-norm), then continue with --resume {args.save}")
        found, note = ckpt.latest(args.save, run_id)
        if found is not None:
            where, step = 1, ckpt.step_of(found)
    if where == 0 and args.resume:
        meta = ckpt.read_meta(args.resume)
        where, step, note = 2, meta["step"], meta.get("note")
    if where:
        if note:
            print(f"train.py: {note}", flush=True)
        ckpt.check_trusted(_step_dir(args, where, step), args.trust_checkpoint)
        later = [c.name for c in ckpt.foreign(args.save, run_id) if ckpt.step_of(c) > step] if args.save else []
        if later:
            raise ckpt.CheckpointError(
                f"--save {args.save} holds {', '.join(later[:3])} of another run, after step {step} where "
                "this run resumes; this run would write over them: save it elsewhere (--save NEWDIR)")
    return where, step


def _step_dir(args: argparse.Namespace, where: int, step: int) -> Path:
    p = Path(args.save if where == 1 else args.resume)
    return p if (p / ckpt.META).exists() or (p / ckpt.LEGACY_META).exists() else p / f"step_{step:06d}"


def resume(layout: Layout, ck: dict[str, Any], args: argparse.Namespace, params, buffers, opt,
           announce: bool | None = None) -> int:
    """Load the checkpoint ``ck`` into this rank's state; returns the step it resumes at. The
    ``announce``-ing rank (rank 0 unless given) says so."""
    try:
        ckpt.check_model(ck, layout.shapes)
    except ckpt.CheckpointError as e:
        stop(str(e))
    kind = ck.get("optimizer_kind", args.optimizer)
    if kind != args.optimizer and not args.reset_optimizer:
        stop(f"{ck['path']} holds the state of --optimizer {kind}, this run uses --optimizer {args.optimizer}; "
             f"resume with --optimizer {kind}, or add --reset-optimizer to start {args.optimizer}'s state afresh "
             "from the checkpoint's weights")
    try:
        ckpt.restore(layout, ck, params, buffers, opt, args.trust_checkpoint, with_optimizer=not args.reset_optimizer)
    except ckpt.CheckpointError as e:  # torn since rank 0 looked, or not this rank's to read
        stop(f"rank {layout.rank}: {e}")
    if layout.rank == 0 if announce is None else announce:
        reset = f" ({args.optimizer}'s state starts afresh)" if args.reset_optimizer else ""
        print(f"resuming from {ck['path']} at step {ck['step']}{reset}", flush=True)
    return ck["step"]


def resumed_layout(layout: Layout, ck: dict[str, Any] | None) -> Layout:
    """A re-balanced run resumes on the shares (and shard lengths) it had reached."""
    saved = tuple(ck.get("shares") or ()) if ck is not None else ()
    if (layout.rebalance and len(saved) == layout.world_size and sum(saved) == layout.global_batch
            and saved != layout.shares):
        return layout.with_shares(saved)
    return layout


class Checkpointer:
    """Writes this run's checkpoints to ``--save`` every ``--save-every`` steps and after the last."""

    def __init__(self, args: argparse.Namespace, run_id: str, persistent: set[str], last: str | None) -> None:
        self.args, self.run_id, self.persistent = args, run_id, persistent
        self.last = last  # the newest checkpoint this run can be continued from

    def due(self, done: int) -> bool:
        a = self.args
        return bool(a.save) and ((a.save_every and done % a.save_every == 0) or done == a.steps)

    def save(self, done: int, layout: Layout, params, buffers, opt, data: RankData, amp: Precision) -> None:
        tensors, stored = ckpt.rank_tensors(layout, params, buffers, opt, self.persistent)
        meta = {**stored, "data_position": data.position(done), "optimizer_kind": self.args.optimizer,
                "shares": list(data.shares_at(done)), "world_size": layout.world_size,
                "plan": layout.plan_digest, "scaler": amp.state_dict()}
        self.last = str(ckpt.save(self.args.save, done, tensors, meta, layout.rank, barrier, self.run_id))


def tokens_per_sample(samples) -> int:
    """A sample's tokens, where the batch holds token sequences (an int64 tensor of one dim), else 1."""
    return next((shape[0] for shape, dtype in samples if len(shape) == 1 and dtype == "int64"), 1)


def replan_advice(layout: Layout, hint: str, save: str | None) -> str:
    """Suggest a new plan when the measured speeds have moved far from the plan's: with them
    another strategy may win, and a checkpoint resumes under any plan."""
    resume = f"--resume {save}" if save else "--resume DIR (run with --save DIR to have checkpoints)"
    return (f"{hint}; moving samples keeps every rank busy, but for these speeds another strategy may be "
            f"faster: set that rank's slowdown in the cluster file, re-plan (hap-plan {layout.spec} --cluster "
            f"CLUSTER.toml --emit NEW) and continue from the last checkpoint (torchrun ... NEW/train.py {resume})")


def check_val_split(spec: ModuleType, args: argparse.Namespace, global_batch: int) -> None:
    """``--eval-every`` needs a validation split of at least one global batch: found at start-up,
    not at the first evaluation."""
    if not args.eval_every or not hasattr(spec, "dataset"):
        return
    try:
        n = len(spec.dataset("val"))
    except Exception as e:
        raise Refused(f"--eval-every: the spec's dataset('val') failed: {type(e).__name__}: {e}") from e
    if n < global_batch:
        raise Refused(f"--eval-every {args.eval_every}: the val split has {n} items, fewer than one global batch "
                      f"of {global_batch}; give the spec a larger val split, or run without --eval-every")


def prepare(program: Program, args: argparse.Namespace):
    """What each rank sets up on its own: the spec, its model and the TensorBoard writer. A rank
    whose spec is missing, fails, or builds another model is found here, and every rank stops
    together, each with its message. Returns (spec, model, writer)."""
    spec = model = board = None
    try:
        wrong = optim.check(args)
        if wrong:
            raise Refused(wrong)
        spec = load_spec(program)
        model = build_model(spec, args.seed, meta=True)
        check_shapes(program.layout, model)
        check_val_split(spec, args, program.layout.global_batch)
        board = tensorboard_writer(args.tensorboard, program.layout.rank)
        wrong = None
    except Refused as e:
        wrong = str(e)
    agree_or_stop(program, wrong)
    return spec, model, board


def slowdown_schedule(specs: list[str], rank: int) -> dict[int, float]:
    """``--slowdown-at STEP:RANK:FACTOR`` entries for this rank: step -> its emulated slowdown."""
    out = {}
    for text in specs:
        try:
            step, r, factor = text.split(":")
            step, r, factor = int(step), int(r), float(factor)
        except ValueError:
            stop(f"--slowdown-at {text}: expected STEP:RANK:FACTOR, e.g. --slowdown-at 8:0:4")
        if r == rank:
            out[step] = factor
    return out


def move_shards(before: Layout, after: Layout, params, opt) -> None:
    """From layout ``before`` to ``after`` (new shares): every rank's sharded parameters and
    their optimizer moments are cut again to the new lengths (one parameter at a time, gathered
    whole and sliced), in memory, in the same order on every rank; gradients start afresh."""
    r = after.rank

    def recut(t: torch.Tensor, dim: int, old: tuple[int, ...], new: tuple[int, ...]) -> torch.Tensor:
        return gather_full(t, "S", dim, old).narrow(dim, offset(new, r), new[r]).clone()

    with torch.no_grad():
        for name, p in after.params.items():
            old = before.params[name].lengths
            if not p.sharded or tuple(old) == tuple(p.lengths):
                continue
            t = params[name]
            state = opt.state.get(t, {})
            for k, v in list(state.items()):
                if torch.is_tensor(v) and v.dim() and v.shape == t.shape:
                    state[k] = recut(v, p.dim, old, p.lengths)
            t.data = recut(t, p.dim, old, p.lengths)
            t.grad = None


def shares_allowed(layout: Layout, shares: tuple[int, ...]) -> bool:
    """Shares a re-balancing may move to: none leaves a rank without its part of a dim that
    every rank holds part of now (a weight or feature dim of length 0 on a rank is not run)."""
    return all(0 in ls or 0 not in split_lengths(size, unit, shares) for (size, unit), ls in layout.lengths.items())


class Rebalancing:
    """The re-balancing hook: each step every rank's measured compute rides on the loss's
    all-reduce; the Rebalancer decides new shares from them, which the data loader applies
    ``data.lookahead`` steps on (the steps it has drawn already keep theirs)."""

    def __init__(self, layout: Layout, args: argparse.Namespace) -> None:
        self.layout = layout  # the layout the run is on now: shares_allowed reads its lengths
        self.balancer = Rebalancer(layout.shares, lambda shares: shares_allowed(self.layout, shares))
        self.args, self.rank, self.world = args, layout.rank, layout.world_size
        self.events: list[dict[str, Any]] = []
        self.compute_log: list[list[float]] = []
        self.advice: list[str] = []

    @staticmethod
    def wanted(layout: Layout, args: argparse.Namespace) -> bool:
        return layout.world_size > 1 and layout.rebalance and not args.no_rebalance

    def riders(self, compute_s: float) -> list[float]:
        """This rank's compute, in its slot: summed over ranks with the loss."""
        return [compute_s if r == self.rank else 0.0 for r in range(self.world)]

    def observe(self, riders: list[float], step: int, data: RankData, layout: Layout) -> None:
        self.layout = layout
        self.compute_log.append([float(x) for x in riders[:self.world]])
        decided = self.balancer.observe(self.compute_log[-1])
        if decided is None:
            return
        at = step + data.lookahead
        data.reshare(decided[0], at)
        self.events.append({"step": at, "shares": list(decided[0]), "reason": decided[1]})
        if self.rank == 0:
            print(f"re-balancing from step {at}: shares {list(decided[0])} ({decided[1]})", flush=True)
        hint = self.balancer.replan_hint()
        if hint and not self.advice:
            self.advice.append(replan_advice(layout, hint, self.args.save))
            if self.rank == 0:
                print(f"train.py: {self.advice[-1]}", flush=True)


def micro_counts(layout: Layout, flag: int | None) -> tuple[int, ...]:
    """Per rank, how many micro-batches it runs its share in: ``--micro-batches K`` for every
    rank, else the plan's; a forward made for whole batches only runs 1."""
    if flag is not None and flag < 1:
        stop(f"--micro-batches {flag}: give 1 or more micro-batches per step")
    counts = (flag,) * layout.world_size if flag is not None else layout.micro_batches
    if max(counts) > 1 and layout.fixed_batch:
        stop(f"--micro-batches {max(counts)}: this plan's forward only runs whole global batches ("
             f"{'; '.join(layout.fixed_batch)}); run without --micro-batches or re-plan with a smaller --batch-size")
    return counts


class Trainer:
    """One training step of this rank: forward and backward over its share in micro-batches,
    the gradient all-reduce, the global loss, the gradient norm and the optimizer step."""

    def __init__(self, forward: Callable, params, buffers, opt, amp: Precision, grad_sync: GradSync,
                 args: argparse.Namespace, counts: tuple[int, ...], sharded: list[str]) -> None:
        self.forward, self.params, self.buffers, self.opt = forward, params, buffers, opt
        self.amp, self.grad_sync, self.args, self.counts, self.sharded = amp, grad_sync, args, counts, sharded
        # a class loss's global count of targets rides in the gradient sync (count_deferred)
        # rather than in an all-reduce of its own inside forward, where every rank would wait
        # for the slowest to reach the loss; off for a forward of several class losses (one
        # factor fixes one denominator) once the first forward shows it
        self.defer_counts = is_distributed()
        self.probed = False  # whether a step ran with the counts deferred

    def backward(self, layout: Layout, batch, step: int) -> tuple[torch.Tensor, tuple[float, float] | None]:
        """Forward and backward over this rank's share of the step in micro-batches (hap.runtime.micro),
        gradients accumulating; gradient buckets are reduced after the last. Returns the summed loss
        addend and, when class-loss counts were deferred, (this rank's true count, the stand-in).
        Each forward's random ops draw from streams of (seed, step, micro-batch, rank) (hap.runtime.rng)."""
        rows = micro.schedule(layout.shares, self.counts, layout.lockstep)
        pieces = len(rows) > 1
        mine = micro.runs(rows, layout.rank, layout.lockstep)
        total = None
        defer = pieces or self.defer_counts
        # the first deferred forward may run again (several class losses): its buffer updates
        # (BatchNorm's running statistics) must then not count twice
        saved = {k: v.clone() for k, v in self.buffers.items()} if defer and not pieces and not self.probed else None
        self.probed = True
        with count_deferred() if defer else contextlib.nullcontext([]) as seen:
            for j in mine:
                with undilated():
                    part = micro.take(batch, layout.inputs, layout.shares, rows, j, layout.rank) if pieces else batch
                self.grad_sync.hold = j != mine[-1]  # buckets are complete after the last micro-batch
                seed_step(self.args.seed, step, layout.rank, j)
                with self.amp.autocast():
                    loss = self.forward(layout.with_rows(rows[j]), self.params, self.buffers, part)
                if not pieces and len(seen) > 1:  # whole shares: count each class loss in forward instead
                    break
                with deferred_grads():  # gathered weights' reduce-scatters run while backward computes
                    self.amp.backward(loss)
                total = loss.detach() if total is None else total + loss.detach()
                if j == mine[0] and len(seen) > 1:
                    stop("--micro-batches: this model computes more than one class loss with ignored targets per "
                         "forward, whose counts micro-batches cannot defer; run without --micro-batches")
        self.grad_sync.hold = False
        if not pieces and len(seen) > 1:  # nothing ran backward yet: the step again, counting in forward
            self.defer_counts = False
            for k, v in (saved or {}).items():
                self.buffers[k].copy_(v)
            return self.backward(layout, batch, step)
        if not seen:
            return total, None
        return total, (float(sum(c for c, _ in seen)), seen[0][1])

    def global_loss(self, loss: torch.Tensor, counted, riders: list[float]) -> float:
        """The step's loss over every rank (the last gradient bucket's all-reduce carries it and
        the ``riders``); with deferred class-loss counts, the stand-in denominator becomes the
        global batch's true count, in the loss and in every gradient."""
        if counted is not None:  # this rank's class-loss count of its micro-batches (count_deferred)
            riders = [*riders, float(counted[0])]
        total = self.grad_sync.finish(loss.float(), torch.tensor(riders, dtype=torch.float64) if riders else None)
        if counted is not None:
            fix = counted[1] / float(self.grad_sync.riders[-1])
            if fix != 1.0:
                total *= fix
                optim.scale_grads(self.params, fix)
        return total

    def update(self, step: int) -> tuple[float, float]:
        """The optimizer step at ``step``'s learning rate; returns (gradient norm, lr). Every step
        measures the norm: a finite loss can still give non-finite gradients, which must not be
        applied (the caller stops first unless fp16's scaler skips the step)."""
        self.amp.unscale(self.opt)  # fp16: true gradients before they are measured and clipped
        clip = self.args.clip_grad_norm
        norm = (optim.clip_grad_norm(self.params, self.sharded, clip) if clip
                else optim.grad_norm(self.params, self.sharded))
        return norm, optim.lr_at(step, self.args)

    def apply(self, lr: float) -> None:
        optim.set_lr(self.opt, lr)
        self.amp.step(self.opt)  # fp16: every rank skips the step if any rank's gradients overflowed


def validate(layout: Layout, forward: Callable, spec: ModuleType, params, buffers, amp, max_batches: int) -> float:
    """Mean loss over the first ``max_batches`` global batches of ``dataset("val")``, each rank
    computing its share. The forward is the training graph's (dropout and batch statistics as in
    training); the buffers are restored afterwards, and each training step seeds its own random
    streams (hap.runtime.rng), so validating does not change what training computes."""
    saved = {k: v.clone() for k, v in buffers.items()}
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in val_batches(spec, layout.rank, layout.shares, layout.inputs, layout.input_samples,
                                 layout.device, max_batches):
            with amp.autocast():
                total += sum_scalar(forward(layout, params, buffers, batch).float())
            n += 1
    for k, v in saved.items():
        buffers[k].copy_(v)
    return total / max(n, 1)


def join_job(devices: tuple[str, ...], places: tuple[tuple[int, int, int], ...]) -> int:
    """Join the job torchrun started for a plan of these devices (per rank) and places: its size
    and backend checked first; returns this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != len(devices):
        stop(f"this plan needs {len(devices)} ranks, but WORLD_SIZE={world}; run it with "
             f"torchrun --nproc-per-node {len(devices)} (or re-plan for {world} ranks)")
    try:
        backend = backend_for(devices)
    except ValueError as e:
        stop(str(e))
    if backend == "nccl":
        missing = cuda_missing(devices)
        if missing:  # before any CUDA call: torch.cuda.set_device fails obscurely without CUDA
            stop(missing)
    rank = int(os.environ.get("RANK", "0"))  # the GPU of this rank's planned model on a node with several
    gpu = planned_gpu(devices, places, rank) if backend == "nccl" else None
    return init(backend, gpu)[0]


def start(program: Program) -> tuple[Program, int]:
    """Join the process group and check this rank is where the plan puts it; returns the
    program placed on this rank and the torchrun restart count."""
    layout = program.layout
    rank = join_job(layout.devices, layout.places)
    program = replace(program, layout=layout.placed(rank, device()))
    agree_on_place(program)
    return program, restart_count()


def agree_on_place(program: Program) -> None:
    """Every rank checks it runs on the device and node the plan puts it on (``program``'s
    layout placed on this rank); if one does not, all stop together."""
    layout = program.layout
    rank = layout.rank
    wrong = device_mismatch(layout.devices[rank], layout.device) or placement_mismatch(*layout.places[rank])
    agree_or_stop(program, f"rank {rank}: {wrong}; start the ranks in the plan's order (see the docstring) "
                  "or re-plan for this cluster" if wrong else None)


def restart_count() -> int:
    """Which attempt of its torchrun job this is (0: the first)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def hap_version() -> str:
    """The installed hap's version (from its package metadata: the runtime imports no planner)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hap")
    except PackageNotFoundError:
        return "unknown"


def _hash48(data: bytes) -> int:
    return int(hashlib.sha256(data).hexdigest()[:12], 16)


def agree_or_stop(program: Program, wrong: str | None) -> None:
    """A rank that fails a check prints why first; then every rank learns (one all-reduce)
    whether any rank failed, and whether every rank runs the same program (plan digest, the
    train.py file, the hap version); if not, all of them stop together, each saying why: no
    rank waits in a collective that a stopped rank never enters."""
    if wrong:
        print(f"train.py: {wrong}", file=sys.stderr, flush=True)
    layout, hap = program.layout, hap_version()
    world, r = layout.world_size, layout.rank
    with open(program.file, "rb") as f:
        mine = (1.0 if wrong else 0.0, int(layout.plan_digest, 16), _hash48(f.read()), _hash48(hap.encode()),
                layout.places[r][0])
    table = torch.zeros(len(mine), world, dtype=torch.float64, device=layout.device)
    table[:, r] = torch.tensor(mine, dtype=torch.float64)
    _all_reduce(table)
    failed, digests, files, versions, nodes = (row.long().tolist() for row in table.cpu())
    differ = [q for q in range(world) if (digests[q], files[q], versions[q]) != (digests[0], files[0], versions[0])]
    if differ:
        rows = "; ".join(f"rank {q} on node {nodes[q]} runs plan {digests[q]:012x}"
                         + (", another train.py" if files[q] != files[0] else "")
                         + (", another hap version" if versions[q] != versions[0] else "") for q in differ[:4])
        print(f"train.py: the ranks run different programs: rank 0 runs plan {digests[0]:012x} (hap {hap} here on "
              f"rank {r}); {rows}. Copy rank 0's train.py and spec to every node and install the same hap "
              "there (one checkout of the repository on every node)", file=sys.stderr, flush=True)
        leave(1)
    if sum(failed):
        if not wrong:
            print(f"train.py: stopping: rank(s) {', '.join(str(q) for q in range(world) if failed[q])} failed a "
                  "start-up check (see their message)", file=sys.stderr, flush=True)
        run_stop_hooks()
        leave(1)


def stop_non_finite(layout: Layout, args: argparse.Namespace, run_id: str, what: str, step: int,
                    last_saved: str | None) -> NoReturn:
    """Stop on a non-finite loss or gradient (every rank sees the same value). Rank 0 leaves a
    note in ``--save`` first: torchrun restarts any failed job, and the restart would resume from
    the last checkpoint into the same values, so a restarted attempt reads the note and stops."""
    if args.save and layout.rank == 0:
        with contextlib.suppress(OSError):  # the message below matters more than the note
            ckpt.mark_stopped(args.save, run_id, step, what)
    stop(f"{what} at step {step}; stopping. Last good checkpoint: "
         f"{last_saved or 'none (use --save DIR --save-every K)'}", 3)


def refuse_old_program(module: ModuleType) -> NoReturn:
    """A train.py of module constants (before the layout): its contract is not this runtime's."""
    spec = getattr(module, "SPEC", "SPEC")
    stop(f"this train.py was emitted by an older hap (module constants, not a layout of format {FORMAT}); "
         f"re-emit it with the installed hap: hap-plan {spec} --emit DIR --force")


def main(layout: Layout | ModuleType, forward: Callable | None = None, file: str | None = None,
         argv: list[str] | None = None) -> None:
    """Train the program's model: each rank its share of every global batch, one optimizer step
    per batch, checkpoints that resume under any plan."""
    if isinstance(layout, ModuleType):
        refuse_old_program(layout)
    args = parse_args(argv, layout.optimizer)
    if args.write_init:  # one process, before any process group
        write_init(Program(layout, forward, os.path.abspath(file)), args)
        return
    program, restarts = start(Program(layout, forward, os.path.abspath(file)))
    spec, model, board = prepare(program, args)
    run_id = open_save(program, args, restarts)
    ck = resume_point(program, args, run_id, restarts)
    layout = resumed_layout(program.layout, ck)
    params, buffers, pretrained = rank_state(program, layout, args, spec, model, ck)
    if pretrained is not None and pretrained.casts and layout.rank == 0:
        print(f"train.py: PRETRAINED {pretrained.dir}: cast " + ", ".join(f"{a} -> {b}" for a, b in
                                                                          sorted(pretrained.casts)) +
              " to the model's parameter dtypes, as load_state_dict does", flush=True)
    opt = optim.build(args, params, {name: len(layout.shapes[p.keys[0]]) for name, p in layout.params.items()})
    start_step = resume(layout, ck, args, params, buffers, opt) if ck is not None else 0
    reduce_dtype = {"fp32": None, "bf16": torch.bfloat16}[layout.grad_reduce]
    grad_sync = GradSync([[params[n] for n in b] for b in layout.grad_buckets], overlap=layout.grad_overlap,
                         reduce_dtype=reduce_dtype)
    amp = Precision(layout.precision, layout.device)
    if ck is not None:
        amp.load_state_dict(ck.get("scaler"))
    try:
        data = RankData(spec, layout.rank, layout.shares, layout.inputs, layout.input_samples, args.seed,
                        start_step, args.steps, args.prefetch, layout.device)
    except ValueError as e:  # a dataset smaller than one global batch: the same on every rank
        stop(str(e))
    trainer = Trainer(forward, params, buffers, opt, amp, grad_sync, args, micro_counts(layout, args.micro_batches),
                      layout.sharded)
    log = RunLog(layout.rank, args.steps, board, layout.global_batch,
                 layout.global_batch * tokens_per_sample(layout.input_samples))
    saver = Checkpointer(args, run_id, set(model.state_dict()), ck["path"] if ck else None)
    rebalancing = Rebalancing(layout, args) if Rebalancing.wanted(layout, args) else None
    at_start = memory_bytes_now(layout.device)  # the model's state is in place, no step has run
    phases = Phases()
    layout = train(layout, trainer, data, log, saver, rebalancing, spec, run_id, start_step, phases)
    if args.dump_params:
        state = full_state_dict(layout, model, params, buffers)
        if layout.rank == 0:
            torch.save(state, args.dump_params)
    waits = torch.tensor(data.waits, dtype=torch.float64)
    _all_reduce(waits, "max")  # a step waits for the slowest rank's batch
    peaks = torch.zeros(3, layout.world_size, dtype=torch.float64)
    peaks[:, layout.rank] = torch.tensor([peak_memory_bytes(layout.device), at_start,
                                          pretrained.read_bytes if pretrained is not None else 0],
                                         dtype=torch.float64)
    _all_reduce(peaks, "sum")  # each rank's own figures, gathered to every rank
    phase_s = phases.gathered(layout.rank, layout.world_size, _all_reduce)
    data.close()
    log.close(args.log_json, data_wait_s=waits.tolist(), phase_s=phase_s, grad_overlap_s=phases.overlap_s,
              world_size=layout.world_size, first_step=start_step,
              precision=amp.name, grad_reduce=layout.grad_reduce, skipped_steps=amp.skipped,
              rebalance=rebalancing.events if rebalancing else [],
              compute_s=rebalancing.compute_log if rebalancing else [],
              advice=rebalancing.advice if rebalancing else [], peak_memory_bytes=[int(x) for x in peaks[0].tolist()],
              start_memory_bytes=[int(x) for x in peaks[1].tolist()],
              **({"pretrained_read_bytes": [int(x) for x in peaks[2].tolist()]} if pretrained is not None else {}))
    if args.save and layout.rank == 0:
        ckpt.unlock(args.save, run_id)
    leave(0)  # every rank done communicating, then out without gloo's teardown


def train(layout: Layout, trainer: Trainer, data: RankData, log: RunLog, saver: Checkpointer,
          rebalancing: Rebalancing | None, spec: ModuleType, run_id: str, start_step: int,
          phases: Phases) -> Layout:
    """The step loop, from ``start_step`` to ``--steps``, each step's phases timed into ``phases``;
    returns the layout it ended on (a re-balancing changes the shares)."""
    args = trainer.args
    slowdowns = slowdown_schedule(args.slowdown_at, layout.rank) if args.emulate else {}
    if args.emulate:  # from here on: the set-up before is not the emulated device's compute
        set_emulation(layout.slowdown[layout.rank])
    for step in range(start_step, args.steps):
        if step in slowdowns:
            set_emulation(slowdowns[step])
        if data.shares_at(step) != layout.shares:  # a re-balancing decided earlier starts here
            before, layout = layout, layout.with_shares(data.shares_at(step))
            with undilated():  # moving shards is not the emulated device's compute
                move_shards(before, layout, trainer.params, trainer.opt)
        t0 = time.perf_counter()
        with undilated():  # --emulate slows forward + backward only
            try:
                batch = data.next(step)  # this rank's share of the step's global batch
            except BadBatch as e:
                stop(str(e))
        c0, comm0 = time.perf_counter(), comm_seconds()
        phases.add("data_wait", c0 - t0)
        trainer.opt.zero_grad(set_to_none=True)  # backward writes fresh gradients: no zeroing pass
        z = time.perf_counter()
        loss, counted = trainer.backward(layout, batch, step)
        backward_end = time.perf_counter()
        end_segment()  # the emulated slowdown of this step's compute, spent now so it is measured
        if layout.device.type == "cuda":
            torch.cuda.synchronize(layout.device)
        g0 = time.perf_counter()
        exposed = comm_seconds() - comm0
        compute_s = g0 - z - exposed  # not the time spent in collectives
        phases.add("compute", compute_s)
        phases.add("exposed_comm", exposed)
        data.make_next()  # while this rank waits for the gradient sync
        global_loss = trainer.global_loss(loss, counted, rebalancing.riders(compute_s) if rebalancing else [])
        if not math.isfinite(global_loss):
            stop_non_finite(layout, args, run_id, f"loss is {global_loss}", step, saver.last)
        o0 = time.perf_counter()
        phases.add("grad_sync", o0 - g0)
        early = trainer.grad_sync.launched_before
        phases.overlap_s.append(backward_end - early if early is not None else 0.0)
        with undilated():
            norm, lr = trainer.update(step)
            if not math.isfinite(norm) and not trainer.amp.skips_overflow:
                stop_non_finite(layout, args, run_id, f"the gradient norm is {norm}", step, saver.last)
            trainer.apply(lr)
            if layout.device.type == "cuda":
                torch.cuda.synchronize(layout.device)
        phases.add("optimizer", time.perf_counter() - o0)
        if rebalancing is not None:  # every rank's compute, on every rank
            with undilated():
                rebalancing.observe(trainer.grad_sync.riders, step, data, layout)
        step_s = time.perf_counter() - t0
        phases.end_step(step_s)
        log.step(step, global_loss, lr, norm, step_s, data.waits[-1])
        done = step + 1
        if args.eval_every and hasattr(spec, "dataset") and (done % args.eval_every == 0 or done == args.steps):
            log.validated(step, done, validate(layout, trainer.forward, spec, trainer.params, trainer.buffers,
                                               trainer.amp, args.eval_batches))
        if saver.due(done):
            saver.save(done, layout, trainer.params, trainer.buffers, trainer.opt, data, trainer.amp)
    return layout

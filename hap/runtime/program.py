"""The fixed part of every emitted ``train.py``: its command line, start-up checks, state
sharding, the training loop and checkpoints. ``train.py`` holds what its plan decides (the
tables and the forward over local shards) and calls ``main(sys.modules[__name__])``.

The program module provides:
  SPEC            the model spec, relative to train.py
  PLAN_DIGEST, WORLD_SIZE, GLOBAL_BATCH, SHARES, SLOWDOWN, EXPECTED_DEVICES, PLACES
  PARAMS          placeholder -> (state_dict keys, sharded dim or None, per-rank lengths)
  BUFFERS         placeholder -> state_dict key
  INPUTS          per batch tensor: 0 (sharded on dim 0 by SHARES) or None (replicated)
  INPUT_SAMPLES   per batch tensor: (shape of one sample, dtype)
  SHAPES          state_dict key -> the shape the plan was made for
  GRAD_BUCKETS, GRAD_OVERLAP   the gradient all-reduce of replicated parameters
  PRECISION       "fp32", or the autocast dtype "bf16" / "fp16" forward runs under
  OPTIMIZER       the default of --optimizer
  GRAD_REDUCE     the dtype the replicated parameters' gradients are summed in: "fp32" or "bf16"
  LENGTHS         (size, unit) -> per-rank lengths of a sharded dim; REBALANCE: whether shares may change
  forward(params, buffers, batch) -> this rank's addend of the loss
and reads the globals RANK and DEVICE, which ``main`` sets once the process group is up.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch

from . import checkpoint as ckpt
from . import micro, optim
from .checks import backend_for, cuda_missing, device_mismatch, placement_mismatch, planned_gpu
from .collectives import gather_full, sum_scalar
from .data import BadBatch, RankData, val_batches
from .dist import _all_reduce, barrier, device, init, leave
from .emulate import comm_seconds, end_segment, set_emulation, undilated
from .grad_sync import GradSync
from .precision import Precision
from .rng import seed_step
from .sharded_ops import count_deferred
from .shares import Rebalancer, split_lengths


def parse_args(argv: list[str] | None = None, default_optimizer: str = "sgd") -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="hap-emitted SPMD training program")
    ap.add_argument("--steps", type=int, default=10, help="train until this many steps are done")
    ap.add_argument("--lr", type=float, default=0.01, help="the peak learning rate (default 0.01)")
    optim.add_arguments(ap, default_optimizer)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-json", default=None, help="rank 0 writes losses and step times here")
    ap.add_argument("--dump-params", default=None, help="rank 0 saves the full state_dict after the last step")
    ap.add_argument("--emulate", action="store_true", help="dilate each rank's compute by its SLOWDOWN (CPU emulation)")
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
                    help="dataset specs: batches each of the rank's data workers reads ahead (0: fetch each batch "
                         "when it is needed, in the training loop)")
    ap.add_argument("--eval-every", type=int, default=0, metavar="K",
                    help="dataset specs: report the validation loss every K steps (and after the last)")
    ap.add_argument("--eval-batches", type=int, default=8, metavar="N",
                    help="global batches of the val split each validation reads (default 8)")
    ap.add_argument("--micro-batches", type=int, default=None, metavar="K",
                    help="each rank runs its share of a step in K micro-batches, accumulating gradients, one "
                         "optimizer step per global batch (default: the plan's MICRO_BATCHES, chosen to fit memory)")
    ap.add_argument("--tensorboard", default=None, metavar="DIR",
                    help="rank 0 writes each step's loss, lr, grad-norm and throughput as TensorBoard event files "
                         "to DIR (pip install 'hap[tensorboard]')")
    ap.add_argument("--no-rebalance", action="store_true",
                    help="keep the plan's shares (default: move samples to ranks measured faster, see REBALANCE)")
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


class Refused(Exception):
    """A rank-local start-up problem, with the message ``agree_or_stop`` prints."""


def load_spec(program: ModuleType) -> ModuleType:
    """The model spec, found relative to train.py (the same layout on every node)."""
    path = os.path.join(os.path.dirname(os.path.abspath(program.__file__)), program.SPEC)
    if not os.path.isfile(path):
        raise Refused(f"the model spec {path} is missing on this node; copy it there at the same place relative "
                      f"to train.py (SPEC = {program.SPEC!r})")
    spec = importlib.util.spec_from_file_location("hap_user_spec", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the user's file: say where it failed, on every rank
        raise Refused(f"the model spec {path} failed to import: {type(e).__name__}: {e}") from e
    return mod


def build_model(spec: ModuleType, seed: int) -> torch.nn.Module:
    """The spec's single-device model, initialised as one device would with ``seed``."""
    torch.manual_seed(seed)
    try:
        return spec.model()
    except Exception as e:
        raise Refused(f"the model spec's model() failed: {type(e).__name__}: {e}") from e


def _rank_slice(full: torch.Tensor, dim: int | None, lengths, rank: int) -> torch.Tensor:
    return full if dim is None else full.narrow(dim, sum(lengths[:rank]), lengths[rank])


def check_shapes(program: ModuleType, model: torch.nn.Module) -> None:
    """Refuse a model other than the planned one (another spec, or the same spec under other
    settings on this node)."""
    sd = {**dict(model.named_buffers()), **model.state_dict()}
    wrong = [f"{k} is {list(sd[k].shape) if k in sd else 'missing'}, the plan has {list(shape)}"
             for k, shape in program.SHAPES.items() if k not in sd or tuple(sd[k].shape) != shape]
    if wrong:
        raise Refused("the spec built a different model than the one planned (" + "; ".join(wrong[:3]) +
                      "); run with the same spec and environment (e.g. its HAP_* size variables) or re-plan")


def local_state(program: ModuleType, model: torch.nn.Module):
    """This rank's shards of the single-device model's parameters and buffers."""
    sd = {**dict(model.named_buffers()), **model.state_dict()}  # non-persistent buffers too
    params = {name: torch.nn.Parameter(_rank_slice(sd[keys[0]].detach(), dim, lengths, program.RANK)
                                       .clone().to(program.DEVICE))
              for name, (keys, dim, lengths) in program.PARAMS.items()}
    buffers = {name: sd[key].detach().clone().to(program.DEVICE) for name, key in program.BUFFERS.items()}
    return params, buffers


def _gather(local: torch.Tensor, dim: int | None, lengths) -> torch.Tensor:
    return local.detach().clone() if dim is None else gather_full(local, "S", dim, lengths)


def full_state_dict(program: ModuleType, model: torch.nn.Module, params, buffers) -> dict[str, torch.Tensor]:
    """The consolidated state_dict, under the single-device model's keys (all ranks take part)."""
    out = {}
    for name, (keys, dim, lengths) in program.PARAMS.items():
        full = _gather(params[name].detach(), dim, lengths)
        for k in keys:
            out[k] = full.cpu()
    for name, key in program.BUFFERS.items():
        out[key] = buffers[name].cpu()
    return {k: out[k] for k in model.state_dict() if k in out}


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def checkpoint_state(program: ModuleType, params, buffers, opt,
                     persistent: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's tensors for a checkpoint (its shards; replicated tensors under one key on
    every rank) and the layout that says how shards make whole tensors (hap.runtime.checkpoint).
    ``persistent``: the model's ``state_dict`` keys; a buffer outside it is saved for resuming
    but not exported (``load_state_dict`` would refuse it)."""
    r = program.RANK
    tensors: dict[str, torch.Tensor] = {}
    layout, states, kept = {}, {}, {}
    for name, (keys, dim, lengths) in program.PARAMS.items():
        key, p = keys[0], params[name].detach()
        entry = {"shape": list(program.SHAPES[key]), "dim": dim, "lengths": list(lengths) if lengths else None,
                 "aliases": list(keys), "dtype": _dtype(p)}
        layout[key] = entry
        tensors[f"model/{key}" if dim is None else f"model/{key}/{r}"] = p
        states[key] = {}
        for sname, v in opt.state.get(params[name], {}).items():
            if torch.is_tensor(v) and v.dim() and v.shape == p.shape:  # a moment: sharded like its parameter
                tensors[f"optim/{key}/{sname}" if dim is None else f"optim/{key}/{sname}/{r}"] = v
                states[key][sname] = {**entry, "dtype": _dtype(v)}
            elif torch.is_tensor(v):  # a scalar such as Adam's step: the same on every rank
                tensors[f"optim/{key}/{sname}"] = v
                states[key][sname] = {"shape": list(v.shape), "dim": None, "lengths": None, "dtype": _dtype(v)}
    for name, key in program.BUFFERS.items():
        tensors[f"model/{key}"] = buffers[name]
        kept[key] = {"shape": list(buffers[name].shape), "dim": None, "lengths": None, "dtype": _dtype(buffers[name]),
                     "persistent": key in persistent}
    return tensors, {"layout": layout, "optimizer": states, "buffers": kept}


def restore(program: ModuleType, meta: dict[str, Any], params, buffers, opt, trust: bool = False,
            with_optimizer: bool = True) -> None:
    """Load a checkpoint's tensors into this rank's shards under this plan (another plan's
    shards are read where they overlap this rank's slice); the optimizer's state too unless
    ``with_optimizer`` is False. ``trust``: see ``checkpoint.check_trusted``."""
    r = program.RANK
    by_alias = {alias: key for key, e in meta["layout"].items() for alias in e["aliases"]}
    wanted: dict[str, torch.Tensor] = {}
    fills = []  # (parameter name or None, optimizer state or buffer name, make)
    for name, (keys, dim, lengths) in program.PARAMS.items():
        key = by_alias[keys[0]]
        buf, make = ckpt.request(f"model/{key}", meta["layout"][key], dim, lengths, r)
        wanted.update(buf)
        fills.append((name, None, make))
        for sname, st in (meta["optimizer"].get(key, {}) if with_optimizer else {}).items():
            buf, make = ckpt.request(f"optim/{key}/{sname}", st, dim if st["dim"] is not None else None, lengths, r)
            wanted.update(buf)
            fills.append((name, sname, make))
    for name, key in program.BUFFERS.items():
        buf, make = ckpt.request(f"model/{key}", meta["buffers"][key], None, None, r)
        wanted.update(buf)
        fills.append((None, name, make))
    ckpt.load(meta["path"], wanted, trust)
    with torch.no_grad():
        for name, sname, make in fills:
            if name is None:
                buffers[sname].copy_(make())
            elif sname is None:
                params[name].copy_(make())
            else:
                opt.state[params[name]][sname] = make().clone().to(program.DEVICE)


def job_id() -> str:
    """What the attempts of one torchrun job share (its rendezvous run id), and nothing else does."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or f"pid{os.getpid()}"


def last_attempt(restarts: int) -> bool:
    return restarts >= int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)


def open_save(program: ModuleType, args: argparse.Namespace, restarts: int) -> str:
    """Rank 0 takes the ``--save`` directory's lock for this run: a directory another live job
    writes is refused, and so is one holding another run's checkpoints when this run does not
    resume. Every rank then checks that it sees rank 0's lock: a directory that is not one shared
    storage on every node would leave other nodes' shards out of every checkpoint. Returns the
    run id, the same on every rank (a restarted attempt continues its run's)."""
    run_id, nonce, wrong = ckpt.new_id(), ckpt.new_id(), None
    if program.RANK == 0 and args.save:
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
    ids = torch.tensor([float(run_id), float(nonce)] if program.RANK == 0 else [0.0, 0.0], dtype=torch.float64,
                       device=program.DEVICE)
    _all_reduce(ids)
    run_id, nonce = (int(x) for x in ids.cpu().tolist())
    if args.save:  # a restarted attempt needs the lock to continue its run
        when_stopping.append(lambda: program.RANK == 0 and last_attempt(restarts)
                             and ckpt.unlock(args.save, f"{run_id:012x}"))
    if args.save and program.WORLD_SIZE > 1:
        seen = ckpt.lock_nonce(args.save)
        agree_or_stop(program, None if seen == nonce else (
            f"rank {program.RANK} (node {program.PLACES[program.RANK][0]}) does not see rank 0's "
            f"{os.path.join(args.save, ckpt.LOCK)}: --save must be one directory on storage every node shares "
            "(NFS, Lustre, a mounted bucket), at the same path on every node"))
    return f"{run_id:012x}"


def resume_point(program: ModuleType, args: argparse.Namespace, run_id: str, restarts: int) -> dict[str, Any] | None:
    """Rank 0 decides whether and from which checkpoint to resume and tells every rank (one
    all-reduce), so ranks never start at different steps; every rank then reads that step's meta.
    A restarted attempt continues from its run's newest complete checkpoint in ``--save``, before
    an older ``--resume``; one whose run stopped for good (``checkpoint.mark_stopped``) stops."""
    where, step, wrong = 0, -1, None  # where: 1 the run's --save, 2 --resume
    if program.RANK == 0:
        try:
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
        except ckpt.CheckpointError as e:
            wrong = str(e)
    agree_or_stop(program, wrong)
    got = torch.tensor([float(where), float(step)] if program.RANK == 0 else [0.0, 0.0], dtype=torch.float64,
                       device=program.DEVICE)
    _all_reduce(got)
    where, step = (int(x) for x in got.cpu().tolist())
    if where == 0:
        return None
    try:
        return ckpt.read_meta(_step_dir(args, where, step))
    except ckpt.CheckpointError as e:  # this rank cannot read what rank 0 read
        stop(f"rank {program.RANK}: {e}")


def _step_dir(args: argparse.Namespace, where: int, step: int) -> Path:
    p = Path(args.save if where == 1 else args.resume)
    return p if (p / ckpt.META).exists() or (p / ckpt.LEGACY_META).exists() else p / f"step_{step:06d}"


def progress_line(step: int, steps: int, loss: float, lr: float, norm: float | None, step_s: list[float],
                  wait_s: float, samples: int, tokens: int) -> str:
    """Rank 0's line per step: loss, learning rate, gradient norm (when clipping), throughput,
    the data wait's share of the step and the time left at the recent pace."""
    recent = step_s[-20:]
    pace = sum(recent) / len(recent)
    left = (steps - step - 1) * pace
    eta = f"{left / 60:.0f}m{left % 60:02.0f}s" if left >= 60 else f"{left:.0f}s"
    rate = f"{tokens / pace:,.0f} tok/s" if tokens != samples else f"{samples / pace:,.0f} samples/s"
    gnorm = f"  grad-norm {norm:.3g}" if norm is not None else ""
    return (f"step {step:4d}  loss {loss:.6f}  lr {lr:.3g}{gnorm}  {step_s[-1] * 1e3:7.1f} ms  {rate}  "
            f"data wait {wait_s / step_s[-1]:3.0%}  eta {eta}")


def replan_advice(program: ModuleType, hint: str, save: str | None) -> str:
    """Suggest a new plan when the measured speeds have moved far from the plan's: with them
    another strategy may win, and a checkpoint resumes under any plan."""
    resume = f"--resume {save}" if save else "--resume DIR (run with --save DIR to have checkpoints)"
    return (f"{hint}; moving samples keeps every rank busy, but for these speeds another strategy may be "
            f"faster: set that rank's slowdown in the cluster file, re-plan (hap-plan {program.SPEC} --cluster "
            f"CLUSTER.toml --emit NEW) and continue from the last checkpoint (torchrun ... NEW/train.py {resume})")


def tensorboard_writer(logdir: str | None, rank: int):
    """Rank 0's TensorBoard writer for ``--tensorboard DIR`` (None without it, and on other ranks)."""
    if not logdir or rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise Refused(f"--tensorboard {logdir}: the tensorboard package is not installed; pip install "
                      "'hap[tensorboard]' (or run without --tensorboard: --log-json records the same values)") from None
    return SummaryWriter(logdir)


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


def prepare(program: ModuleType, args: argparse.Namespace):
    """What each rank sets up on its own: the spec, its model and the TensorBoard writer. A rank
    whose spec is missing, fails, or builds another model is found here, and every rank stops
    together, each with its message. Returns (spec, model, writer)."""
    spec = model = board = None
    try:
        wrong = optim.check(args)
        if wrong:
            raise Refused(wrong)
        spec = load_spec(program)
        model = build_model(spec, args.seed)
        check_shapes(program, model)
        check_val_split(spec, args, program.GLOBAL_BATCH)
        board = tensorboard_writer(args.tensorboard, program.RANK)
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


def use_shares(program: ModuleType, shares: tuple[int, ...]) -> None:
    """From this step on every rank takes ``shares`` of the global batch: the program's SHARES
    and ROWS, and the lengths of every sharded dim (LENGTHS, the sharded PARAMS) follow."""
    program.SHARES = program.ROWS = tuple(shares)
    for (size, unit) in list(program.LENGTHS):
        program.LENGTHS[size, unit] = split_lengths(size, unit, shares)
    for name, (size, unit) in getattr(program, "PARAM_SPLITS", {}).items():
        keys, dim, _ = program.PARAMS[name]
        program.PARAMS[name] = (keys, dim, split_lengths(size, unit, shares))


def move_shards(program: ModuleType, params, opt, before: dict[str, tuple[int, ...] | None]) -> None:
    """After ``use_shares``: every rank's sharded parameters and their optimizer moments are cut
    again from their ``before`` lengths to the new ones (one parameter at a time, gathered whole
    and sliced), in memory, in the same order on every rank; gradients start afresh."""
    def recut(t: torch.Tensor, dim: int, old: tuple[int, ...], new: tuple[int, ...]) -> torch.Tensor:
        full = gather_full(t, "S", dim, old)
        return full.narrow(dim, sum(new[:program.RANK]), new[program.RANK]).clone()

    with torch.no_grad():
        for name, (_, dim, lengths) in program.PARAMS.items():
            if dim is None or tuple(before[name]) == tuple(lengths):
                continue
            p = params[name]
            state = opt.state.get(p, {})
            for k, v in list(state.items()):
                if torch.is_tensor(v) and v.dim() and v.shape == p.shape:
                    state[k] = recut(v, dim, before[name], lengths)
            p.data = recut(p, dim, before[name], lengths)
            p.grad = None


def shares_allowed(program: ModuleType, shares: tuple[int, ...]) -> bool:
    """Shares a re-balancing may move to: none leaves a rank without its part of a dim that
    every rank holds part of now (a weight or feature dim of length 0 on a rank is not run)."""
    return all(0 in ls or 0 not in split_lengths(size, unit, shares)
               for (size, unit), ls in program.LENGTHS.items())


def micro_counts(program: ModuleType, flag: int | None) -> tuple[int, ...]:
    """Per rank, how many micro-batches it runs its share in: ``--micro-batches K`` for every
    rank, else the plan's MICRO_BATCHES; a forward made for whole batches only runs 1."""
    if flag is not None and flag < 1:
        stop(f"--micro-batches {flag}: give 1 or more micro-batches per step")
    counts = (flag,) * program.WORLD_SIZE if flag is not None else \
        tuple(getattr(program, "MICRO_BATCHES", None) or (1,) * program.WORLD_SIZE)
    fixed = getattr(program, "FIXED_BATCH", ("this program predates micro-batches",))
    if max(counts) > 1 and fixed:
        stop(f"--micro-batches {max(counts)}: this plan's forward only runs whole global batches ("
             f"{'; '.join(fixed)}); run without --micro-batches or re-plan with a smaller --batch-size")
    return counts


def run_micro_batches(program: ModuleType, params, buffers, batch, counts: tuple[int, ...], grad_sync: GradSync,
                      amp: Precision, seed: int, step: int) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """Forward and backward over this rank's share of the step in micro-batches (hap.runtime.micro),
    gradients accumulating; gradient buckets are reduced after the last. Returns the summed loss
    addend and, when class-loss counts were deferred, (this rank's true count, the stand-in).
    Each forward's random ops draw from streams of (seed, step, micro-batch, rank) (hap.runtime.rng)."""
    lockstep = getattr(program, "LOCKSTEP", True)
    rows = micro.schedule(program.SHARES, counts, lockstep)
    pieces = len(rows) > 1  # whole shares count class-loss targets in forward (one all-reduce)
    mine = micro.runs(rows, program.RANK, lockstep)
    total = None
    with count_deferred() if pieces else contextlib.nullcontext([]) as seen:
        for j in mine:
            program.ROWS = rows[j]
            with undilated():
                part = micro.take(batch, program.INPUTS, program.SHARES, rows, j, program.RANK) if pieces else batch
            grad_sync.hold = j != mine[-1]  # buckets are complete after the last micro-batch
            seed_step(seed, step, program.RANK, j)
            with amp.autocast():
                loss = program.forward(params, buffers, part)
            amp.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
            if j == mine[0] and len(seen) > 1:
                stop("--micro-batches: this model computes more than one class loss with ignored targets per "
                     "forward, whose counts micro-batches cannot defer; run without --micro-batches")
    grad_sync.hold = False
    program.ROWS = program.SHARES
    if not seen:
        return total, None
    return total, (float(sum(c for c, _ in seen)), seen[0][1])


def validate(program: ModuleType, spec: ModuleType, params, buffers, amp, max_batches: int) -> float:
    """Mean loss over the first ``max_batches`` global batches of ``dataset("val")``, each rank
    computing its share. The forward is the training graph's (dropout and batch statistics as in
    training); the buffers are restored afterwards, and each training step seeds its own random
    streams (hap.runtime.rng), so validating does not change what training computes."""
    saved = {k: v.clone() for k, v in buffers.items()}
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in val_batches(spec, program.RANK, program.SHARES, program.INPUTS, program.INPUT_SAMPLES,
                                 program.DEVICE, max_batches):
            with amp.autocast():
                total += sum_scalar(program.forward(params, buffers, batch).float())
            n += 1
    for k, v in saved.items():
        buffers[k].copy_(v)
    return total / max(n, 1)


def start(program: ModuleType) -> int:
    """Join the process group and check this rank is where the plan puts it; returns the
    torchrun restart count. Sets the program's RANK and DEVICE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != program.WORLD_SIZE:
        stop(f"this plan needs {program.WORLD_SIZE} ranks, but WORLD_SIZE={world}; run it with "
             f"torchrun --nproc-per-node {program.WORLD_SIZE} (or re-plan for {world} ranks)")
    try:
        backend = backend_for(program.EXPECTED_DEVICES)
    except ValueError as e:
        stop(str(e))
    if backend == "nccl":
        missing = cuda_missing(program.EXPECTED_DEVICES)
        if missing:  # before any CUDA call: torch.cuda.set_device fails obscurely without CUDA
            stop(missing)
    rank = int(os.environ.get("RANK", "0"))  # the GPU of this rank's planned model on a node with several
    gpu = planned_gpu(program.EXPECTED_DEVICES, program.PLACES, rank) if backend == "nccl" else None
    program.RANK, _ = init(backend, gpu)
    program.DEVICE = device()
    wrong = (device_mismatch(program.EXPECTED_DEVICES[program.RANK], program.DEVICE)
             or placement_mismatch(*program.PLACES[program.RANK]))
    agree_or_stop(program, f"rank {program.RANK}: {wrong}; start the ranks in the plan's order (see the docstring) "
                  "or re-plan for this cluster" if wrong else None)
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


def agree_or_stop(program: ModuleType, wrong: str | None) -> None:
    """A rank that fails a check prints why first; then every rank learns (one all-reduce)
    whether any rank failed, and whether every rank runs the same program (plan digest, the
    train.py file, the hap version); if not, all of them stop together, each saying why: no
    rank waits in a collective that a stopped rank never enters."""
    if wrong:
        print(f"train.py: {wrong}", file=sys.stderr, flush=True)
    world, r, hap = program.WORLD_SIZE, program.RANK, hap_version()
    with open(program.__file__, "rb") as f:
        mine = (1.0 if wrong else 0.0, int(program.PLAN_DIGEST, 16), _hash48(f.read()), _hash48(hap.encode()),
                program.PLACES[r][0])
    table = torch.zeros(len(mine), world, dtype=torch.float64, device=program.DEVICE)
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


def stop_non_finite(program: ModuleType, args: argparse.Namespace, run_id: str, what: str, step: int,
                    last_saved: str | None) -> NoReturn:
    """Stop on a non-finite loss or gradient (every rank sees the same value). Rank 0 leaves a
    note in ``--save`` first: torchrun restarts any failed job, and the restart would resume from
    the last checkpoint into the same values, so a restarted attempt reads the note and stops."""
    if args.save and program.RANK == 0:
        with contextlib.suppress(OSError):  # the message below matters more than the note
            ckpt.mark_stopped(args.save, run_id, step, what)
    stop(f"{what} at step {step}; stopping. Last good checkpoint: "
         f"{last_saved or 'none (use --save DIR --save-every K)'}", 3)


def main(program: ModuleType, argv: list[str] | None = None) -> None:
    """Train the program's model: each rank its share of every global batch, one optimizer step
    per batch, checkpoints that resume under any plan."""
    args = parse_args(argv, getattr(program, "OPTIMIZER", "sgd"))
    restarts = start(program)
    rank = program.RANK
    spec, model, board = prepare(program, args)
    run_id = open_save(program, args, restarts)
    ck = resume_point(program, args, run_id, restarts)
    saved = tuple(ck.get("shares") or ()) if ck is not None else ()
    if (getattr(program, "REBALANCE", False) and len(saved) == program.WORLD_SIZE
            and sum(saved) == program.GLOBAL_BATCH and saved != tuple(program.SHARES)):
        use_shares(program, saved)  # a re-balanced run resumes on the shares (and shard lengths) it had reached
    params, buffers = local_state(program, model)
    opt = optim.build(args, params, {name: len(program.SHAPES[keys[0]]) for name, (keys, _, _) in
                                     program.PARAMS.items()})
    sharded = [name for name, (_, dim, _) in program.PARAMS.items() if dim is not None]
    start_step = 0
    if ck is not None:
        try:
            ckpt.check_model(ck, program.SHAPES)
        except ckpt.CheckpointError as e:
            stop(str(e))
        kind = ck.get("optimizer_kind", args.optimizer)
        if kind != args.optimizer and not args.reset_optimizer:
            stop(f"{ck['path']} holds the state of --optimizer {kind}, this run uses --optimizer {args.optimizer}; "
                 f"resume with --optimizer {kind}, or add --reset-optimizer to start {args.optimizer}'s state afresh "
                 "from the checkpoint's weights")
        try:
            restore(program, ck, params, buffers, opt, args.trust_checkpoint, with_optimizer=not args.reset_optimizer)
        except ckpt.CheckpointError as e:  # torn since rank 0 looked, or not this rank's to read
            stop(f"rank {rank}: {e}")
        start_step = ck["step"]
        if rank == 0:
            reset = f" ({args.optimizer}'s state starts afresh)" if args.reset_optimizer else ""
            print(f"resuming from {ck['path']} at step {start_step}{reset}", flush=True)
    reduce_dtype = {"fp32": None, "bf16": torch.bfloat16}[getattr(program, "GRAD_REDUCE", "fp32")]
    grad_sync = GradSync([[params[n] for n in b] for b in program.GRAD_BUCKETS], overlap=program.GRAD_OVERLAP,
                         reduce_dtype=reduce_dtype)
    amp = Precision(getattr(program, "PRECISION", "fp32"), program.DEVICE)
    if ck is not None:
        amp.load_state_dict(ck.get("scaler"))
    try:
        data = RankData(spec, rank, program.SHARES, program.INPUTS, program.INPUT_SAMPLES, args.seed, start_step,
                        args.steps, args.prefetch, program.DEVICE)
    except ValueError as e:  # a dataset smaller than one global batch: the same on every rank
        stop(str(e))
    losses, step_s, val, lrs, norms = [], [], [], [], []
    samples = program.GLOBAL_BATCH
    tokens = samples * next((x[0][0] for x in program.INPUT_SAMPLES if len(x[0]) == 1 and x[1] == "int64"), 1)
    last_saved = ck["path"] if ck else None
    slowdowns = slowdown_schedule(args.slowdown_at, rank) if args.emulate else {}
    balancer = (Rebalancer(program.SHARES, lambda shares: shares_allowed(program, shares))
                if program.WORLD_SIZE > 1 and getattr(program, "REBALANCE", False) and not args.no_rebalance else None)
    events, compute_log, advice = [], [], []
    counts = micro_counts(program, args.micro_batches)
    if args.emulate:  # from here on: the set-up above is not the emulated device's compute
        set_emulation(program.SLOWDOWN[rank])
    for step in range(start_step, args.steps):
        if step in slowdowns:
            set_emulation(slowdowns[step])
        if data.shares_at(step) != tuple(program.SHARES):  # a re-balancing decided earlier starts here
            before = {name: lengths for name, (_, _, lengths) in program.PARAMS.items()}
            use_shares(program, data.shares_at(step))
            with undilated():  # moving shards is not the emulated device's compute
                move_shards(program, params, opt, before)
        t0 = time.perf_counter()
        with undilated():  # --emulate slows forward + backward only
            try:
                batch = data.next(step)  # this rank's share of the step's global batch
            except BadBatch as e:
                stop(str(e))
        c0, comm0 = time.perf_counter(), comm_seconds()
        opt.zero_grad(set_to_none=True)  # backward writes fresh gradients: no zeroing pass
        loss, counted = run_micro_batches(program, params, buffers, batch, counts, grad_sync, amp, args.seed, step)
        end_segment()  # the emulated slowdown of this step's compute, spent now so it is measured
        if program.DEVICE.type == "cuda":
            torch.cuda.synchronize(program.DEVICE)
        compute_s = time.perf_counter() - c0 - (comm_seconds() - comm0)  # not the time spent in collectives
        riders = []  # summed over ranks with the loss, in the last gradient bucket: no extra collective
        if balancer is not None:  # each rank's compute, in its slot
            riders = [compute_s if r == rank else 0.0 for r in range(program.WORLD_SIZE)]
        if counted is not None:  # this rank's class-loss count of its micro-batches (count_deferred)
            riders.append(float(counted[0]))
        global_loss = grad_sync.finish(loss.float(), torch.tensor(riders, dtype=torch.float64) if riders else None)
        if counted is not None:  # the stand-in denominator becomes the global batch's true count
            fix = counted[1] / float(grad_sync.riders[-1])
            if fix != 1.0:
                global_loss *= fix
                with torch.no_grad():
                    for p in params.values():
                        if p.grad is not None:
                            p.grad.mul_(fix)
        if not math.isfinite(global_loss):
            stop_non_finite(program, args, run_id, f"loss is {global_loss}", step, last_saved)
        with undilated():
            amp.unscale(opt)  # fp16: true gradients before they are measured and clipped
            # every step: a finite loss can still give non-finite gradients, which must not be applied
            norms.append(optim.clip_grad_norm(params, sharded, args.clip_grad_norm) if args.clip_grad_norm
                         else optim.grad_norm(params, sharded))
            if not math.isfinite(norms[-1]) and not amp.skips_overflow:
                stop_non_finite(program, args, run_id, f"the gradient norm is {norms[-1]}", step, last_saved)
            lrs.append(optim.lr_at(step, args))
            optim.set_lr(opt, lrs[-1])
            amp.step(opt)  # fp16: every rank skips the step if any rank's gradients overflowed
            if balancer is not None:  # every rank's compute, on every rank
                compute_log.append([float(x) for x in grad_sync.riders[:program.WORLD_SIZE]])
                decided = balancer.observe(compute_log[-1])
                if decided is not None:
                    at = step + data.lookahead
                    data.reshare(decided[0], at)
                    events.append({"step": at, "shares": list(decided[0]), "reason": decided[1]})
                    if rank == 0:
                        print(f"re-balancing from step {at}: shares {list(decided[0])} ({decided[1]})", flush=True)
                    hint = balancer.replan_hint()
                    if hint and not advice:
                        advice.append(replan_advice(program, hint, args.save))
                        if rank == 0:
                            print(f"train.py: {advice[-1]}", flush=True)
        step_s.append(time.perf_counter() - t0)
        losses.append(global_loss)
        if rank == 0:
            print(progress_line(step, args.steps, global_loss, lrs[-1], norms[-1] if norms else None, step_s,
                                data.waits[-1], samples, tokens), flush=True)
        if board is not None:
            board.add_scalar("train/loss", global_loss, step)
            board.add_scalar("train/lr", lrs[-1], step)
            if norms:
                board.add_scalar("train/grad_norm", norms[-1], step)
            board.add_scalar("train/step_s", step_s[-1], step)
            board.add_scalar("train/tokens_per_s" if tokens != samples else "train/samples_per_s",
                             tokens / step_s[-1], step)
        done = step + 1
        if args.eval_every and hasattr(spec, "dataset") and (done % args.eval_every == 0 or done == args.steps):
            val.append({"step": done, "loss": validate(program, spec, params, buffers, amp, args.eval_batches)})
            if rank == 0:
                print(f"step {step:4d}  val loss {val[-1]['loss']:.6f}", flush=True)
            if board is not None:
                board.add_scalar("val/loss", val[-1]["loss"], done)
        if args.save and ((args.save_every and done % args.save_every == 0) or done == args.steps):
            tensors, layout = checkpoint_state(program, params, buffers, opt, set(model.state_dict()))
            meta = {**layout, "data_position": data.position(done), "optimizer_kind": args.optimizer,
                    "shares": list(data.shares_at(done)), "world_size": program.WORLD_SIZE,
                    "plan": program.PLAN_DIGEST, "scaler": amp.state_dict()}
            last_saved = str(ckpt.save(args.save, done, tensors, meta, rank, barrier, run_id))
    if args.dump_params:
        state = full_state_dict(program, model, params, buffers)
        if rank == 0:
            torch.save(state, args.dump_params)
    if board is not None:
        board.close()
    waits = torch.tensor(data.waits, dtype=torch.float64)
    _all_reduce(waits, "max")  # a step waits for the slowest rank's batch
    data.close()
    if args.log_json and rank == 0:
        with open(args.log_json, "w") as f:
            json.dump({"losses": losses, "step_s": step_s, "data_wait_s": waits.tolist(), "val_losses": val,
                       "lr": lrs, "grad_norm": norms,
                       "world_size": program.WORLD_SIZE, "first_step": start_step, "precision": amp.name,
                       "grad_reduce": getattr(program, "GRAD_REDUCE", "fp32"), "skipped_steps": amp.skipped,
                       "rebalance": events, "compute_s": compute_log, "advice": advice}, f)
    if args.save and rank == 0:
        ckpt.unlock(args.save, run_id)
    leave(0)  # every rank done communicating, then out without gloo's teardown

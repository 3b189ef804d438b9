"""The training loop of a pipelined program: each rank runs one stage of the model.

``train.py`` of a pipelined plan holds a layout and a forward per stage and the ``Stages``
table. A rank joins its stage (``dist.enter_stage``): from there on its stage's collectives run
within the stage's ranks, exactly as a single-stage program's run within the job, and what
spans stages is point-to-point (``hap.runtime.pipeline``) or an all-reduce over the job.

One step, GPipe with re-materialisation. Every stage splits each micro-batch among its ranks
(``pipeline.micro_rows``) and reads its samples in the stage's order (``stage_positions``),
so micro-batch ``j`` holds the same samples on every stage.

- A stage that sends runs every micro-batch's forward without autograd (``F``), handing each
  rank of the next stage its rows of the activations; it then runs, as each gradient comes
  back, the forward again with autograd and backward (``B``). Its forward's loss is the
  surrogate ``sum(y * grad_y)`` (``hap.stages``), whose backward is exactly the
  vector-Jacobian product with the received gradient.
- The last stage runs forward and backward as each micro-batch's activations arrive.
- A stage that receives sends its inputs' gradients back after each backward.

Exact: gradients accumulate over the micro-batches, normalised by the global batch's count
(the last stage's deferred class-loss count scales every stage's gradients alike); a weight
several stages hold (a tied embedding and head) has its gradients summed across them; the
clipping norm is the whole model's; under fp16 every stage unscales by the same scale and skips
a step together (the scaler's inf check spans the job). The loss rank 0 logs is the last
stage's, sent to every rank.

Not yet: checkpoints (``--save``/``--resume``), re-balancing, ``--eval-every`` and
``--write-init``/``--init`` are refused with a message; every rank builds the model whole from
the seed and keeps its stage's shards.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as tdist

from . import dist as _d
from . import micro, optim
from .checks import device_mismatch, placement_mismatch
from .collectives import deferred_grads
from .data import BadBatch, RankData
from .emulate import end_segment, set_emulation, undilated
from .grad_sync import GradSync
from .layout import Layout
from .logger import RunLog
from .pipeline import micro_rows, receive_cut, send_cut, stage_positions, wait_all
from .precision import Precision
from .pretrained import PretrainedError
from .program import (
    Program,
    Refused,
    Trainer,
    agree_or_stop,
    build_model,
    check_shapes,
    full_state_dict,
    join_job,
    load_spec,
    local_state,
    open_pretrained,
    parse_args,
    stop,
)
from .rng import seed_step
from .sharded_ops import count_deferred

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Stages:
    """What a pipelined train.py states beside its per-stage layouts.

    ranks          per stage: its global ranks
    shares         per stage: its ranks' samples of each global batch
    inputs         per stage: the model's batch tensors it reads (their index in the batch)
    cuts           per cut: the activations it hands on, each (shape of one sample, dtype)
    samples        per batch tensor of the model: (shape of one sample, dtype)
    micro_batches  the default of --micro-batches
    shared         weights several stages hold: (state_dict keys, stages)
    plan_digest, places, devices, slowdown: the whole job's, per global rank
    """
    ranks: tuple[tuple[int, ...], ...]
    shares: tuple[tuple[int, ...], ...]
    inputs: tuple[tuple[int, ...], ...]
    cuts: tuple[tuple[tuple[tuple[int, ...], str], ...], ...]
    samples: tuple[tuple[tuple[int, ...], str], ...]
    micro_batches: int
    shared: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]
    plan_digest: str
    places: tuple[tuple[int, int, int], ...]
    devices: tuple[str, ...]
    slowdown: tuple[float, ...]
    index: int = 0  # this rank's stage (``placed``)
    tied_groups: tuple[Any, ...] = field(default=())  # per entry of ``shared`` this rank holds: its group

    @property
    def world_size(self) -> int:
        return sum(len(r) for r in self.ranks)

    @property
    def last(self) -> bool:
        return self.index == len(self.ranks) - 1


class StageTrainer(Trainer):
    """``Trainer`` for one pipeline stage: the step's micro-batches run under the schedule above."""

    def __init__(self, stages: Stages, layout: Layout, forward: Callable, *args, **kwargs) -> None:
        super().__init__(forward, *args, **kwargs)
        self.stages, self.m = stages, self.counts[0]
        s = stages.index
        self.me = _d.global_rank()
        self.prev = stages.ranks[s - 1] if s > 0 else ()
        self.next = stages.ranks[s + 1] if not stages.last else ()
        self.layout = layout
        self.rows = micro_rows(layout.shares, self.m)
        self.rows_prev = micro_rows(stages.shares[s - 1], self.m) if s > 0 else []
        self.rows_next = micro_rows(stages.shares[s + 1], self.m) if not stages.last else []
        self.sent: list = []

    def backward(self, layout: Layout, batch, step: int) -> tuple[torch.Tensor, tuple[float, float] | None]:
        st, rows, rank = self.stages, self.rows, layout.rank
        dims = [layout.inputs[k] for k in range(len(st.inputs[st.index]))]
        parts = []
        for j in range(self.m):
            with undilated():
                parts.append(micro.take(batch, dims, layout.shares, rows, j, rank) if self.m > 1 else list(batch))
        received: list[list[torch.Tensor]] = []
        sends = st.cuts[st.index] if not st.last else ()
        for j in range(self.m if not st.last else 0):  # F: every micro-batch's activations handed on, none kept
            received.append(self.receive_activations(j))
            zeros = [torch.zeros((rows[j][rank], *shape), dtype=DTYPES[dtype], device=layout.device)
                     for shape, dtype in sends]
            seed_step(self.args.seed, step, rank, j)
            saved = {k: v.clone() for k, v in self.buffers.items()}
            with torch.no_grad(), self.amp.autocast():
                _, ys = self.forward(layout.with_rows(rows[j]), self.params, self.buffers, [*parts[j], *received[j],
                                                                                            *zeros])
            for k, v in saved.items():  # the forward runs again in B: buffers update once
                self.buffers[k].copy_(v)
            for i, (y, (_, dtype)) in enumerate(zip(ys, sends)):
                self.sent.extend(send_cut(y.detach().to(DTYPES[dtype]).contiguous(), self.me, st.ranks[st.index],
                                          rows[j], self.next, self.rows_next[j], tag=self.tag(j, i)))
        total = None
        with count_deferred() if st.last else contextlib.nullcontext([]) as seen:
            for j in range(self.m):  # B: forward again with autograd, backward, gradients handed back
                inputs = received[j] if not st.last else self.receive_activations(j)
                xs = [x.requires_grad_() if x.is_floating_point() else x for x in inputs]
                grads = self.receive_gradients(j, sends)
                self.grad_sync.hold = j != self.m - 1
                seed_step(self.args.seed, step, rank, j)
                with self.amp.autocast():
                    out = self.forward(layout.with_rows(rows[j]), self.params, self.buffers, [*parts[j], *xs, *grads])
                loss = out if st.last else out[0]
                with deferred_grads():
                    if st.last:
                        self.amp.backward(loss)
                    else:  # the gradients received are the last stage's, loss scale included
                        loss.backward()
                if st.last:
                    total = loss.detach() if total is None else total + loss.detach()
                    if j == 0 and len(seen) > 1:
                        stop("this model computes more than one class loss with ignored targets per forward, whose "
                             "counts a pipelined program cannot defer; plan it with --stages 1")
                if self.prev:
                    for i, x in enumerate(xs):
                        g = x.grad if x.grad is not None else torch.zeros_like(x)
                        self.sent.extend(send_cut(g.contiguous(), self.me, st.ranks[st.index], rows[j], self.prev,
                                                  self.rows_prev[j], tag=self.tag(j, i, back=True)))
        self.grad_sync.hold = False
        with undilated():
            wait_all(self.sent)
        self.sent = []
        if total is None:
            total = torch.zeros((), device=layout.device)
        if not seen:
            return total, None
        return total, (float(sum(c for c, _ in seen)), seen[0][1])

    def tag(self, j: int, i: int, back: bool = False) -> int:
        return (2 * (j * 64 + i) + int(back)) % (1 << 30)

    def receive_activations(self, j: int) -> list[torch.Tensor]:
        """Micro-batch ``j``'s activations from the previous stage (none on the first)."""
        cut = self.stages.cuts[self.stages.index - 1] if self.prev else ()
        return self.receive(j, self.prev, self.rows_prev, cut, back=False)

    def receive_gradients(self, j: int, sends) -> list[torch.Tensor]:
        """The gradients of micro-batch ``j``'s sent activations, from the next stage (none on the last)."""
        return self.receive(j, self.next, self.rows_next, sends if self.next else (), back=True)

    def receive(self, j: int, senders, their_rows, metas, back: bool) -> list[torch.Tensor]:
        st = self.stages
        return [receive_cut(self.me, senders, their_rows[j], st.ranks[st.index], self.rows[j], tuple(shape),
                            DTYPES[dtype], _d.device(), tag=self.tag(j, i, back))
                for i, (shape, dtype) in enumerate(metas)]

    def global_loss(self, loss: torch.Tensor, counted, riders: list[float]) -> float:
        """The step's loss, from the last stage to every rank, and the global batch's true class
        count applied to every stage's gradients (the last stage's gradients, and so every
        stage's, were computed with the stand-in denominator)."""
        riders = [*riders, float(counted[0])] if counted is not None else riders
        total = self.grad_sync.finish(loss.float(), torch.tensor(riders, dtype=torch.float64) if riders else None)
        fix = counted[1] / float(self.grad_sync.riders[-1]) if counted is not None else 1.0
        first = self.stages.last and _d.rank() == 0
        both = torch.tensor([total if first else 0.0, fix if first else 0.0], dtype=torch.float64)
        _d._all_reduce(both, everywhere=True)
        total, fix = (float(x) for x in both)
        if fix != 1.0:
            optim.scale_grads(self.params, fix)
        self.sum_shared()
        return total * fix

    def sum_shared(self) -> None:
        """A weight several stages hold: its gradient summed over them (each stage's first rank
        adds its stage's, the others zeros), so that every holder steps alike."""
        st = self.stages
        for (keys, _), group in zip(held(st), st.tied_groups):
            name = next(n for n, p in self.layout.params.items() if tuple(p.keys) == tuple(keys))
            p = self.params[name]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if _d.rank() != 0:
                p.grad.zero_()
            _d._all_reduce(p.grad, group=group)

    def update(self, step: int) -> tuple[float, float]:
        """The optimizer step's gradient norm over the whole model (every stage's squares, a
        weight several stages hold counted once) and clipping by it."""
        self.amp.unscale(self.opt)
        st = self.stages
        first = {tuple(keys): where[0] for keys, where in st.shared}  # the stage that counts a shared weight
        own = {name: p for name, p in self.params.items()
               if first.get(tuple(self.layout.params[name].keys), st.index) == st.index}
        stage = optim.grad_squares(own, [name for name in self.sharded if name in own])
        squares = torch.tensor([stage if _d.rank() == 0 else 0.0], dtype=torch.float64)  # the stage's, once
        _d._all_reduce(squares, everywhere=True)
        norm = math.sqrt(float(squares[0]))
        if self.args.clip_grad_norm:
            optim.scale_grads(self.params, optim.clip_coefficient(norm, self.args.clip_grad_norm))
        return norm, optim.lr_at(step, self.args)


def held(stages: Stages) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """The entries of ``stages.shared`` this rank's stage holds."""
    return [(keys, where) for keys, where in stages.shared if stages.index in where]


def refuse_unsupported(args) -> None:
    for flag, on in (("--save", args.save), ("--resume", args.resume), ("--eval-every", args.eval_every),
                     ("--init", args.init), ("--write-init", args.write_init), ("--slowdown-at", args.slowdown_at)):
        if on:
            stop(f"{flag}: a pipelined program does not support it yet; plan with --stages 1 to use it")


def start(stages: Stages, layouts: Sequence[Layout]) -> tuple[int, Layout]:
    """Join the job; returns this rank's stage and its layout placed on this rank."""
    rank = join_job(stages.devices, stages.places)
    index = next(i for i, ranks in enumerate(stages.ranks) if rank in ranks)
    return index, layouts[index].placed(stages.ranks[index].index(rank), _d.device())


def join_stage(stages: Stages) -> Stages:
    """Make every stage's group and the tied weights' groups (every rank alike, in order), and
    run this rank's collectives in its stage from here on."""
    index = _d.enter_stage(stages.ranks)
    groups = [_d.new_group([r for s in where for r in stages.ranks[s]]) for _, where in stages.shared]
    return Stages(**{**stages.__dict__, "index": index,
                     "tied_groups": tuple(g for g, (_, where) in zip(groups, stages.shared) if index in where)})


def main(layouts: Sequence[Layout], stages: Stages, forwards: Sequence[Callable], file: str,
         argv: list[str] | None = None) -> None:
    """Train the program's model, each rank its stage's part of every global batch."""
    args = parse_args(argv, layouts[0].optimizer)
    refuse_unsupported(args)
    index, layout = start(stages, layouts)
    forward = forwards[index]
    program = Program(layout, forward, os.path.abspath(file))
    rank = _d.rank()  # in the job: the stage's groups come after the checks below
    wrong = device_mismatch(stages.devices[rank], layout.device) or placement_mismatch(*stages.places[rank])
    if wrong:
        wrong = (f"rank {rank}: {wrong}; start the ranks in the plan's order (see the docstring) or re-plan for "
                 "this cluster")
    try:
        spec = load_spec(program)
        model = build_model(spec, args.seed)
        check_shapes(layout, model)
        params, buffers = local_state(layout, model, None, open_pretrained(spec))
    except (Refused, PretrainedError) as e:
        wrong = wrong or str(e)
    # every rank runs this plan and this train.py, and none failed the checks above (the same
    # check as a single-stage program's, over the whole job): else all stop together
    job = SimpleNamespace(world_size=stages.world_size, rank=rank, plan_digest=stages.plan_digest,
                          places=stages.places, device=layout.device)
    agree_or_stop(Program(job, forward, program.file), wrong)
    stages = join_stage(stages)
    m = args.micro_batches if args.micro_batches is not None else stages.micro_batches
    if m < 1:
        stop(f"--micro-batches {m}: give 1 or more micro-batches per step")
    if layout.fixed_batch and m > 1:
        stop(f"--micro-batches {m}: this plan's forward only runs whole global batches "
             f"({'; '.join(layout.fixed_batch)}); run with --micro-batches 1")
    opt = optim.build(args, params, {name: len(layout.shapes[p.keys[0]]) for name, p in layout.params.items()})
    reduce_dtype = {"fp32": None, "bf16": torch.bfloat16}[layout.grad_reduce]
    grad_sync = GradSync([[params[n] for n in b] for b in layout.grad_buckets], overlap=layout.grad_overlap,
                         reduce_dtype=reduce_dtype)
    amp = Precision(layout.precision, layout.device)
    if amp.scaler is not None and not stages.last:
        amp.scaler.scale(torch.zeros((), device=layout.device))  # its scale exists before the first unscale
    rows = micro_rows(layout.shares, m)
    positions = stage_positions(layout.shares, rows)
    dims = [0] * len(stages.samples)
    for k, i in enumerate(stages.inputs[stages.index]):
        dims[i] = layout.inputs[k]
    try:
        data = RankData(spec, layout.rank, layout.shares, dims, stages.samples, args.seed, 0, args.steps,
                        args.prefetch, layout.device, positions)
    except ValueError as e:
        stop(str(e))
    trainer = StageTrainer(stages, layout, forward, params, buffers, opt, amp, grad_sync, args,
                           (m,) * layout.world_size, layout.sharded)
    log = RunLog(_d.global_rank(), args.steps, None, layout.global_batch, layout.global_batch)
    if args.emulate:
        set_emulation(layout.slowdown[layout.rank])
    for step in range(args.steps):
        t0 = time.perf_counter()
        with undilated():
            try:
                batch = data.next(step)
            except BadBatch as e:
                stop(str(e))
        mine = [batch[i] for i in stages.inputs[stages.index]]
        trainer.opt.zero_grad(set_to_none=True)
        loss, counted = trainer.backward(layout, mine, step)
        end_segment()
        data.make_next()  # the batch thread may make the next step's rows while this one's gradients sync
        global_loss = trainer.global_loss(loss, counted, [])
        if not math.isfinite(global_loss):
            stop(f"loss is {global_loss} at step {step}; stopping", 3)
        with undilated():
            norm, lr = trainer.update(step)
            if not math.isfinite(norm) and not amp.skips_overflow:
                stop(f"the gradient norm is {norm} at step {step}; stopping", 3)
            trainer.apply(lr)
        log.step(step, global_loss, lr, norm, time.perf_counter() - t0, data.waits[-1] if data.waits else 0.0)
    if args.dump_params:
        dump(args.dump_params, layout, model, params, buffers)
    data.close()
    log.close(args.log_json, world_size=stages.world_size, precision=amp.name, skipped_steps=amp.skipped,
              stages=[list(r) for r in stages.ranks], micro_batches=m)
    _d.leave(0)


def dump(path: str, layout: Layout, model: torch.nn.Module, params, buffers) -> None:
    """``--dump-params``: every stage's consolidated parameters, gathered to global rank 0."""
    state = full_state_dict(layout, model, params, buffers)  # on the stage's first rank
    got: list[Any] = [None] * _d._S.every_world if _d.global_rank() == 0 else None
    tdist.gather_object(state if _d.rank() == 0 else None, got, dst=0)
    if _d.global_rank() == 0:
        whole = {k: v for part in got if part for k, v in part.items()}
        torch.save({k: whole[k] for k in model.state_dict() if k in whole}, path)  # in the model's key order

"""The training loop of a pipelined program: each rank runs one stage of the model.

``train.py`` of a pipelined plan holds a layout and a forward per stage and the ``Stages``
table. A rank joins its stage (``dist.enter_stage``): from there on its stage's collectives run
within the stage's ranks, exactly as a single-stage program's run within the job, and what
spans stages is point-to-point (``hap.runtime.pipeline``) or an all-reduce over the job.

One step runs each stage's micro-batches in the plan's order, 1F1B or GPipe
(``pipeline.stage_order``). Every stage splits each micro-batch among its ranks
(``pipeline.micro_rows``) and reads its samples in the stage's order (``stage_positions``),
so micro-batch ``j`` holds the same samples on every stage.

- A stage that sends runs ``F``, a micro-batch's forward with autograd, handing each rank of
  the next stage its rows of the activations and keeping the graph; ``B``, as the gradients
  come back, is the backward of its outputs with them: exactly the vector-Jacobian product,
  which is what the surrogate loss ``sum(y * grad_y)`` (``hap.stages``) the plan was solved
  with differentiates to.
- The last stage runs forward and backward as each micro-batch's activations arrive.
- A stage that receives sends its inputs' gradients back after each backward.

Exact: gradients accumulate over the micro-batches, normalised by the global batch's count
(the last stage's deferred class-loss count scales every stage's gradients alike); a weight
several stages hold (a tied embedding and head) has its gradients summed in one all-reduce over
all their ranks, outside each stage's own gradient sync (``sum_shared``); the
clipping norm is the whole model's; under fp16 every stage unscales by the same scale and skips
a step together (the scaler's inf check spans the job). The loss rank 0 logs is the last
stage's, sent to every rank.

The start-up and the checkpoints are a single-stage program's, over the whole job: each rank
builds the model on the meta device and reads only its stage's slices of the initial state
(``--init``, or the one its node writes), of ``PRETRAINED`` weights or of a checkpoint; every
stage writes its own parameters into one checkpoint (``StageCheckpointer``), which resumes under
any plan. ``--eval-every`` runs each validation batch through the stages whole
(``StageTrainer.validate``). A stage of several ranks re-balances its shares of each
micro-batch as a single-stage program does (measured compute, less the time waiting on other
ranks); every stage learns every stage's new shares with the step's loss, so the cuts' rows
follow from the same step on (``plan_reshare``, ``reshare``).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as tdist

from . import checkpoint as ckpt
from . import dist as _d
from . import micro, optim
from .collectives import deferred_grads, sum_scalar
from .data import BadBatch, RankData, val_batches
from .emulate import comm_seconds, end_segment, set_emulation, undilated
from .grad_sync import GradSync
from .layout import Layout
from .logger import RunLog
from .pipeline import micro_rows, receive_cut, send_cut, stage_order, stage_positions, wait_all
from .precision import Precision
from .program import (
    Checkpointer,
    Program,
    Rebalancing,
    Trainer,
    agree_on_place,
    full_state_dict,
    join_job,
    move_shards,
    open_save,
    parse_args,
    prepare,
    rank_state,
    replan_advice,
    restart_count,
    resume,
    resume_point,
    shares_allowed,
    slowdown_schedule,
    stop,
    stop_non_finite,
    tokens_per_sample,
    write_init,
)
from .rng import seed_step
from .sharded_ops import count_deferred
from .shares import Rebalancer

VAL_TAGS = 1 << 29  # validation's point-to-point tags start here, above any training step's
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
    schedule       "1f1b" or "gpipe" (``pipeline.stage_order``)
    warmup         1f1b: forwards each stage runs ahead beyond its own warm-up
    shared         weights several stages hold: (state_dict keys, stages)
    partial        per stage: its shared weights (parameter names) whose gradient each of its ranks
                   holds a part of (a replicated weight whose rows are split), the others' whole
    plan_digest, places, devices, slowdown: the whole job's, per global rank
    """
    ranks: tuple[tuple[int, ...], ...]
    shares: tuple[tuple[int, ...], ...]
    inputs: tuple[tuple[int, ...], ...]
    cuts: tuple[tuple[tuple[tuple[int, ...], str], ...], ...]
    samples: tuple[tuple[tuple[int, ...], str], ...]
    micro_batches: int
    shared: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]
    partial: tuple[tuple[str, ...], ...]
    plan_digest: str
    places: tuple[tuple[int, int, int], ...]
    devices: tuple[str, ...]
    slowdown: tuple[float, ...]
    schedule: str = "1f1b"  # the order of each stage's micro-batches (``pipeline.stage_order``)
    warmup: int = 0
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
        self.sent: list = []
        self.balancer: Rebalancer | None = None  # this stage's, set by main where the stage re-balances
        self.decided: dict[int, tuple[int, ...]] = {}  # the last step's new shares, by stage
        self.compute_log: list[list[float]] = []  # per step: every rank's compute seconds
        self.compute_s = 0.0  # this rank's compute in the step (measured by the loop)
        self.reason = ""  # why this stage last re-balanced
        self.advice: list[str] = []  # this stage's advice to re-plan (``plan_reshare``)
        self.schedule = [(0, stages.shares)]  # (from step, every stage's shares)
        self.set_shares(stages.shares)

    def set_shares(self, shares: Sequence[Sequence[int]]) -> None:
        """Every stage's shares from now on: each micro-batch's rows of this stage and of its
        neighbours, which the cuts exchange."""
        st = self.stages = replace(self.stages, shares=tuple(tuple(x) for x in shares))
        s = st.index
        self.rows = micro_rows(st.shares[s], self.m)
        self.rows_prev = micro_rows(st.shares[s - 1], self.m) if s > 0 else []
        self.rows_next = micro_rows(st.shares[s + 1], self.m) if not st.last else []

    def shares_at(self, step: int) -> tuple[tuple[int, ...], ...]:
        """Every stage's shares at ``step``, with the re-balancings decided before it."""
        return next(sh for at, sh in reversed(self.schedule) if at <= step)

    def backward(self, layout: Layout, batch, step: int) -> tuple[torch.Tensor, tuple[float, float] | None]:
        st, rows, rank = self.stages, self.rows, layout.rank
        dims = [layout.inputs[k] for k in range(len(st.inputs[st.index]))]
        parts = []
        for j in range(self.m):
            with undilated():
                parts.append(micro.take(batch, dims, layout.shares, rows, j, rank) if self.m > 1 else list(batch))
        sends = st.cuts[st.index] if not st.last else ()
        kept: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # j: (inputs, outputs) of F
        total = None
        with count_deferred() if st.last else contextlib.nullcontext([]) as seen:
            for kind, j in stage_order(st.schedule, st.index, len(st.ranks), self.m, st.warmup):
                xs = kept[j][0] if kind == "B" and not st.last else self.inputs(j)
                if kind == "F":  # activations handed on; the graph kept for B
                    zeros = [torch.zeros((rows[j][rank], *shape), dtype=DTYPES[dtype], device=layout.device)
                             for shape, dtype in sends]  # the surrogate's gradient inputs, unused here
                    seed_step(self.args.seed, step, rank, j)
                    with self.amp.autocast():
                        _, ys = self.forward(layout.with_rows(rows[j]), self.params, self.buffers,
                                             [*parts[j], *xs, *zeros])
                    kept[j] = (xs, list(ys))
                    for i, (y, (_, dtype)) in enumerate(zip(ys, sends)):
                        self.sent.extend(send_cut(y.detach().to(DTYPES[dtype]).contiguous(), self.me,
                                                  st.ranks[st.index], rows[j], self.next, self.rows_next[j],
                                                  tag=self.tag(j, i)))
                    continue
                self.grad_sync.hold = j != self.m - 1
                if st.last:  # forward and backward at once
                    seed_step(self.args.seed, step, rank, j)
                    with self.amp.autocast():
                        loss = self.forward(layout.with_rows(rows[j]), self.params, self.buffers, [*parts[j], *xs])
                    with deferred_grads():
                        self.amp.backward(loss)
                    total = loss.detach() if total is None else total + loss.detach()
                    if j == 0 and len(seen) > 1:
                        stop("this model computes more than one class loss with ignored targets per forward, whose "
                             "counts a pipelined program cannot defer; plan it with --stages 1")
                else:  # the vector-Jacobian product with the gradients received (the last stage's
                    # loss scale included), which is the surrogate loss sum(y * grad_y)'s backward
                    grads = self.receive_gradients(j, sends)
                    ys = kept.pop(j)[1]
                    pairs = [(y, g.to(y.dtype)) for y, g in zip(ys, grads) if y.requires_grad]
                    with deferred_grads():
                        torch.autograd.backward([y for y, _ in pairs], [g for _, g in pairs])
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

    def inputs(self, j: int) -> list[torch.Tensor]:
        """Micro-batch ``j``'s activations from the previous stage, as leaves whose gradient B
        sends back (none on the first stage)."""
        return [x.requires_grad_() if x.is_floating_point() else x for x in self.receive_activations(j)]

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

    def validate(self, layout: Layout, spec, dims: Sequence[int | None], max_batches: int) -> float:
        """Mean loss over the first ``max_batches`` global batches of ``dataset("val")``, as a
        single-stage program validates (``program.validate``: the training graph's forward, the
        buffers restored afterwards): each global batch goes through the stages whole, as one
        micro-batch, each rank its share's rows in the stage's order; the last stage's loss,
        summed over its ranks, is sent to every rank."""
        st = self.stages
        mine_rows, sends = tuple(layout.shares), st.cuts[st.index] if not st.last else ()
        prev_rows = tuple(st.shares[st.index - 1]) if self.prev else ()
        next_rows = tuple(st.shares[st.index + 1]) if self.next else ()
        saved = {k: v.clone() for k, v in self.buffers.items()}
        total, n = 0.0, 0
        with torch.no_grad():
            for b, batch in enumerate(val_batches(spec, layout.rank, layout.shares, dims, st.samples, layout.device,
                                                  max_batches)):
                tag = VAL_TAGS + 2 * b * 64
                xs = [receive_cut(self.me, self.prev, prev_rows, st.ranks[st.index], mine_rows, tuple(shape),
                                  DTYPES[dtype], _d.device(), tag=tag + 2 * i)
                      for i, (shape, dtype) in enumerate(st.cuts[st.index - 1] if self.prev else ())]
                inputs = [*(batch[k] for k in st.inputs[st.index]), *xs]
                with self.amp.autocast():
                    if st.last:
                        total += sum_scalar(self.forward(layout.with_rows(mine_rows), self.params, self.buffers,
                                                         inputs).float())
                    else:
                        zeros = [torch.zeros((layout.shares[layout.rank], *shape), dtype=DTYPES[dtype],
                                             device=layout.device) for shape, dtype in sends]
                        _, ys = self.forward(layout.with_rows(mine_rows), self.params, self.buffers,
                                             [*inputs, *zeros])
                if not st.last:
                    wait_all([w for i, (y, (_, dtype)) in enumerate(zip(ys, sends))
                              for w in send_cut(y.to(DTYPES[dtype]).contiguous(), self.me, st.ranks[st.index],
                                                mine_rows, self.next, next_rows, tag=tag + 2 * i)])
                n += 1
        for k, v in saved.items():
            self.buffers[k].copy_(v)
        first = st.last and _d.rank() == 0
        mean = torch.tensor([total / max(n, 1) if first else 0.0], dtype=torch.float64)
        _d._all_reduce(mean, everywhere=True)
        return float(mean[0])

    def global_loss(self, loss: torch.Tensor, counted, riders: list[float]) -> float:
        """The step's loss, from the last stage to every rank, and the global batch's true class
        count applied to every stage's gradients (the last stage's gradients, and so every
        stage's, were computed with the stand-in denominator)."""
        width = len(riders)  # this rank's compute in its slot of the stage, where the stage re-balances
        compute = [0.0] * self.stages.world_size  # every rank's compute, for the log
        compute[self.me] = self.compute_s
        riders = [*riders, float(counted[0])] if counted is not None else riders
        total = self.grad_sync.finish(loss.float(), torch.tensor(riders, dtype=torch.float64) if riders else None)
        fix = counted[1] / float(self.grad_sync.riders[-1]) if counted is not None else 1.0
        first = self.stages.last and _d.rank() == 0
        self.sum_shared()  # the holders' ranks only; the stages that hold none go on to the loss
        # every stage's re-balancing (each rank its new share + 1 in its global slot) rides with the loss
        st, own = self.stages, None
        if self.balancer is not None:
            own = self.balancer.observe([float(x) for x in self.grad_sync.riders[:width]])
        slots = [0.0] * st.world_size
        if own is not None:
            slots[self.me] = own[0][_d.rank()] + 1.0
            self.reason = own[1]
        both = torch.tensor([total if first else 0.0, fix if first else 0.0, *slots, *compute], dtype=torch.float64)
        _d._all_reduce(both, everywhere=True)
        total, fix = float(both[0]), float(both[1])
        self.compute_log.append([float(x) for x in both[2 + st.world_size:]])
        got = [int(round(float(x))) for x in both[2:2 + st.world_size]]
        self.decided = {s: tuple(got[r] - 1 for r in ranks) for s, ranks in enumerate(st.ranks) if got[ranks[0]]}
        if fix != 1.0:
            optim.scale_grads(self.params, fix)
        return total * fix

    def sum_shared(self) -> None:
        """A weight several stages hold: its gradient summed in one all-reduce over every holder
        stage's ranks, so that every holder steps alike. The stages' own syncs leave it out
        (``stage_buckets``): where each rank of the stage holds a part of its gradient
        (``Stages.partial``) every rank adds its own; where each holds the whole, the stage's
        first rank adds it and the others zeros. One all-reduce over the slow link instead of
        one per stage and then one across them."""
        st = self.stages
        for (keys, _), group in zip(held(st), st.tied_groups):
            name = shared_name(self.layout, keys)
            p = self.params[name]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if name not in st.partial[st.index] and _d.rank() != 0:
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


def shared_name(layout: Layout, keys: Sequence[str]) -> str:
    """The stage's parameter known by the state-dict keys ``keys``."""
    return next(n for n, p in layout.params.items() if tuple(p.keys) == tuple(keys))


def stage_buckets(layout: Layout, stages: Stages) -> list[list[str]]:
    """The stage's gradient buckets without the weights several stages hold (``sum_shared``
    reduces those over all their holders at once)."""
    shared = {shared_name(layout, keys) for keys, _ in held(stages)}
    return [kept for b in layout.grad_buckets if (kept := [n for n in b if n not in shared])]


def job_view(stages: Stages, layouts: Sequence[Layout], rank: int, device: torch.device) -> SimpleNamespace:
    """The whole job as the start-up steps that span stages read it (the same ones a single-stage
    program runs on its layout: ``agree_or_stop``, ``prepare``, ``open_save``, ``resume_point``,
    ``initial_state``): every rank, the plan's digest, and every stage's parameter shapes."""
    shapes = {k: v for layout in layouts for k, v in layout.shapes.items()}
    return SimpleNamespace(world_size=stages.world_size, rank=rank, plan_digest=stages.plan_digest,
                           places=stages.places, devices=stages.devices, device=device, spec=layouts[0].spec,
                           shapes=shapes, global_batch=layouts[0].global_batch)


def start(stages: Stages, layouts: Sequence[Layout], forwards: Sequence[Callable],
          file: str) -> tuple[Program, Layout, Callable]:
    """Join the job and check this rank is where the plan puts it; returns the job (``job_view``),
    this rank's stage layout placed on it and its stage's forward."""
    rank = join_job(stages.devices, stages.places)
    index = next(i for i, ranks in enumerate(stages.ranks) if rank in ranks)
    layout = layouts[index].placed(stages.ranks[index].index(rank), _d.device())
    job = Program(job_view(stages, layouts, rank, layout.device), forwards[index], os.path.abspath(file))
    agree_on_place(job)
    return job, layout, forwards[index]


def join_stage(stages: Stages) -> Stages:
    """Make every stage's group and the tied weights' groups (every rank alike, in order), and
    run this rank's collectives in its stage from here on."""
    index = _d.enter_stage(stages.ranks)
    groups = [_d.new_group([r for s in where for r in stages.ranks[s]]) for _, where in stages.shared]
    return Stages(**{**stages.__dict__, "index": index,
                     "tied_groups": tuple(g for g, (_, where) in zip(groups, stages.shared) if index in where)})


class StageCheckpointer(Checkpointer):
    """A pipelined run's checkpoints: the same directory, files and promises as a single-stage
    run's (``hap.runtime.checkpoint``), every stage writing its own parameters (a weight several
    stages hold, the first of them), the layout record merged on global rank 0. So it resumes
    under any plan, with other stages or none, and ``hap-export`` reads it."""

    def __init__(self, stages: Stages, *args) -> None:
        super().__init__(*args)
        self.stages = stages
        keys_first = {keys[0]: where[0] for keys, where in stages.shared}
        self.elsewhere = frozenset(k for k, first in keys_first.items() if first != stages.index)

    def save(self, done: int, layout: Layout, params, buffers, opt, data: RankData, amp: Precision) -> None:
        tensors, stored = ckpt.rank_tensors(layout, params, buffers, opt, self.persistent, self.elsewhere)
        me = _d.global_rank()
        got: list[Any] | None = [None] * self.stages.world_size if me == 0 else None
        tdist.gather_object(stored if _d.rank() == 0 else None, got, dst=0)  # each stage's record, once
        merged: dict[str, dict[str, Any]] = {"layout": {}, "optimizer": {}, "buffers": {}}
        for part in got or []:
            for what, entries in (part or {}).items():
                merged[what].update(entries)
        meta = {**merged, "data_position": data.position(done), "optimizer_kind": self.args.optimizer,
                "stage_shares": [list(s) for s in self.stages.shares], "world_size": self.stages.world_size,
                "plan": self.stages.plan_digest, "scaler": amp.state_dict()}
        self.last = str(ckpt.save(self.args.save, done, tensors, meta, me, lambda: _d.barrier(everywhere=True),
                                  self.run_id))


def main(layouts: Sequence[Layout], stages: Stages, forwards: Sequence[Callable], file: str,
         argv: list[str] | None = None) -> None:
    """Train the program's model, each rank its stage's part of every global batch."""
    args = parse_args(argv, layouts[0].optimizer)
    if args.write_init:  # one process, before any process group
        write_init(Program(job_view(stages, layouts, 0, torch.device("cpu")), forwards[0], os.path.abspath(file)),
                   args)
        return
    restarts = restart_count()
    # the start-up spans the job, as a single-stage program's does: every rank checks the plan
    # and train.py, builds the model on the meta device, takes the --save lock and agrees where
    # to resume; each rank then reads only its stage's slices of the initial state or checkpoint
    job, layout, forward = start(stages, layouts, forwards, file)
    spec, model, board = prepare(job, args)
    run_id = open_save(job, args, restarts)
    ck = resume_point(job, args, run_id, restarts)
    params, buffers, _ = rank_state(job, layout, args, spec, model, ck)  # the job's barrier: no stage yet
    opt = optim.build(args, params, {name: len(layout.shapes[p.keys[0]]) for name, p in layout.params.items()})
    start_step = resume(layout, ck, args, params, buffers, opt, job.layout.rank == 0) if ck is not None else 0
    stages = join_stage(stages)
    m = args.micro_batches if args.micro_batches is not None else stages.micro_batches
    if m < 1:
        stop(f"--micro-batches {m}: give 1 or more micro-batches per step")
    if layout.fixed_batch and m > 1:
        stop(f"--micro-batches {m}: this plan's forward only runs whole global batches "
             f"({'; '.join(layout.fixed_batch)}); run with --micro-batches 1")
    reduce_dtype = {"fp32": None, "bf16": torch.bfloat16}[layout.grad_reduce]
    grad_sync = GradSync([[params[n] for n in b] for b in stage_buckets(layout, stages)],
                         overlap=layout.grad_overlap, reduce_dtype=reduce_dtype)
    amp = Precision(layout.precision, layout.device)
    if ck is not None:
        amp.load_state_dict(ck.get("scaler"))
    if amp.scaler is not None and not stages.last:
        amp.scaler.scale(torch.zeros((), device=layout.device))  # its scale exists before the first unscale
    dims = [0] * len(stages.samples)
    for k, i in enumerate(stages.inputs[stages.index]):
        dims[i] = layout.inputs[k]
    try:
        data = RankData(spec, layout.rank, layout.shares, dims, stages.samples, args.seed, start_step, args.steps,
                        args.prefetch, layout.device, lambda shares: stage_positions(shares, micro_rows(shares, m)))
    except ValueError as e:
        stop(str(e))
    trainer = StageTrainer(stages, layout, forward, params, buffers, opt, amp, grad_sync, args,
                           (m,) * layout.world_size, layout.sharded)
    log = RunLog(_d.global_rank(), args.steps, board, layout.global_batch,
                 layout.global_batch * tokens_per_sample(stages.samples))
    saver = StageCheckpointer(stages, args, run_id, set(model.state_dict()), ck["path"] if ck else None)
    if Rebalancing.wanted(layout, args):  # within the stage: its ranks' shares of each micro-batch
        trainer.balancer = Rebalancer(layout.shares, lambda shares: shares_allowed(trainer.layout, shares))
    events: list[dict[str, Any]] = []
    slowdowns = slowdown_schedule(args.slowdown_at, _d.global_rank()) if args.emulate else {}
    if args.emulate:
        set_emulation(layout.slowdown[layout.rank])
    for step in range(start_step, args.steps):
        t0 = time.perf_counter()
        if step in slowdowns:
            set_emulation(slowdowns[step])
        if trainer.shares_at(step) != trainer.stages.shares:  # a re-balancing decided earlier starts here
            layout = reshare(trainer, layout, trainer.shares_at(step))
            saver.stages = trainer.stages
        with undilated():
            try:
                batch = data.next(step)
            except BadBatch as e:
                stop(str(e))
        mine = [batch[i] for i in stages.inputs[stages.index]]
        trainer.opt.zero_grad(set_to_none=True)
        c0, comm0 = time.perf_counter(), comm_seconds()
        loss, counted = trainer.backward(layout, mine, step)
        end_segment()  # the emulated slowdown of this step's compute, spent now so it is measured
        if layout.device.type == "cuda":
            torch.cuda.synchronize(layout.device)
        compute_s = time.perf_counter() - c0 - (comm_seconds() - comm0)  # not the time waiting on other ranks
        data.make_next()  # the batch thread may make the next step's rows while this one's gradients sync
        riders = [compute_s if r == layout.rank else 0.0 for r in range(layout.world_size)] if trainer.balancer else []
        trainer.compute_s = compute_s
        global_loss = trainer.global_loss(loss, counted, riders)
        if trainer.decided:
            events += plan_reshare(trainer, data, step + data.lookahead)
        if not math.isfinite(global_loss):
            stop_non_finite(job.layout, args, run_id, f"loss is {global_loss}", step, saver.last)
        with undilated():
            norm, lr = trainer.update(step)
            if not math.isfinite(norm) and not amp.skips_overflow:
                stop_non_finite(job.layout, args, run_id, f"the gradient norm is {norm}", step, saver.last)
            trainer.apply(lr)
        log.step(step, global_loss, lr, norm, time.perf_counter() - t0, data.waits[-1] if data.waits else 0.0)
        done = step + 1
        if args.eval_every and hasattr(spec, "dataset") and (done % args.eval_every == 0 or done == args.steps):
            with undilated():
                log.validated(step, done, trainer.validate(layout, spec, dims, args.eval_batches))
        if saver.due(done):
            with undilated():
                saver.save(done, layout, trainer.params, trainer.buffers, trainer.opt, data, amp)
    if args.dump_params:
        dump(args.dump_params, layout, model, params, buffers)
    data.close()
    advice: list[Any] | None = [None] * _d._S.every_world if _d.global_rank() == 0 else None
    tdist.gather_object(trainer.advice if _d.rank() == 0 else [], advice, dst=0)  # each stage's, once
    log.close(args.log_json, world_size=stages.world_size, first_step=start_step, precision=amp.name,
              skipped_steps=amp.skipped, stages=[list(r) for r in stages.ranks], micro_batches=m,
              rebalance=events, compute_s=trainer.compute_log, advice=[a for part in advice or [] for a in part])
    if args.save and job.layout.rank == 0:
        ckpt.unlock(args.save, run_id)
    _d.leave(0)


def plan_reshare(trainer: StageTrainer, data: RankData, at: int) -> list[dict[str, Any]]:
    """The stages' new shares the last step decided (``StageTrainer.decided``, every rank alike),
    from step ``at`` on: this stage's data loader reads its new share from then; returns the
    events, one per stage. Where this stage's ranks' speeds have drifted apart, its first rank
    also says that a new plan may win (it may move layers between the stages too)."""
    st = trainer.stages
    new = list(trainer.shares_at(at))
    for s, shares in trainer.decided.items():
        new[s] = shares
    trainer.schedule.append((at, tuple(new)))
    if st.index in trainer.decided:
        data.reshare(trainer.decided[st.index], at)
        if _d.rank() == 0:
            print(f"re-balancing stage {st.index} from step {at}: shares {list(trainer.decided[st.index])} "
                  f"({trainer.reason})", flush=True)
        hint = trainer.balancer.replan_hint(st.ranks[st.index]) if trainer.balancer else None
        if hint and not trainer.advice:
            trainer.advice.append(replan_advice(trainer.layout, f"stage {st.index}: {hint}", trainer.args.save)
                                  + "; a new plan may also move layers between the stages")
            if _d.rank() == 0:
                print(f"train.py: {trainer.advice[-1]}", flush=True)
    return [{"step": at, "stage": s, "shares": list(shares)} for s, shares in sorted(trainer.decided.items())]


def reshare(trainer: StageTrainer, layout: Layout, shares: Sequence[Sequence[int]]) -> Layout:
    """Every stage's ``shares`` from this step on: this stage's sharded weights and their
    optimizer state cut again where its own changed, every micro-batch's rows of it and of its
    neighbours recomputed; returns this rank's layout."""
    mine = tuple(shares[trainer.stages.index])
    if mine != layout.shares:
        before, layout = layout, layout.with_shares(mine)
        with undilated():  # moving shards is not the emulated device's compute
            move_shards(before, layout, trainer.params, trainer.opt)
        trainer.layout = layout
    trainer.set_shares(shares)
    return layout


def dump(path: str, layout: Layout, model: torch.nn.Module, params, buffers) -> None:
    """``--dump-params``: every stage's consolidated parameters, gathered to global rank 0."""
    state = full_state_dict(layout, model, params, buffers)  # on the stage's first rank
    got: list[Any] = [None] * _d._S.every_world if _d.global_rank() == 0 else None
    tdist.gather_object(state if _d.rank() == 0 else None, got, dst=0)
    if _d.global_rank() == 0:
        whole = {k: v for part in got if part for k, v in part.items()}
        torch.save({k: whole[k] for k in model.state_dict() if k in whole}, path)  # in the model's key order

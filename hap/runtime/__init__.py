"""hap.runtime: what an emitted `train.py` imports.

Uneven, differentiable collectives between placements (R, S(d) with per-rank lengths, P), process
group setup for torchrun (gloo on CPU, NCCL on CUDA, plain single process without WORLD_SIZE),
gradient all-reduce, synchronised batch norm, and slow-device emulation on one CPU machine.

This package imports nothing else from hap (nor PuLP): an emitted program needs only torch and it.
"""

from . import pipelined, program  # the training loops of train.py
from .chunked_loss import chunked_cross_entropy
from .collectives import (
    all_gather,
    all_reduce,
    all_to_all,
    broadcast_,
    gather_full,
    reduce_scatter,
    slice_local,
    sum_scalar,
    to_partial,
)
from .dist import device, init, is_distributed, leave, local_rank, rank, shutdown, world_size
from .emulate import end_segment, set_emulation, undilated
from .experts import experts_parallel
from .grad_sync import GradSync
from .layout import Layout, Param
from .ops import recompute, sync_batch_norm
from .pipelined import Stages
from .prefetch import Prefetch
from .rng import replicated_random, seed_step
from .shares import offset

__all__ = [
    "GradSync",
    "Layout",
    "Param",
    "Prefetch",
    "Stages",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "broadcast_",
    "chunked_cross_entropy",
    "device",
    "end_segment",
    "experts_parallel",
    "gather_full",
    "init",
    "is_distributed",
    "leave",
    "local_rank",
    "offset",
    "pipelined",
    "program",
    "recompute",
    "replicated_random",
    "rank",
    "seed_step",
    "reduce_scatter",
    "set_emulation",
    "shutdown",
    "slice_local",
    "sum_scalar",
    "sync_batch_norm",
    "to_partial",
    "undilated",
    "world_size",
]

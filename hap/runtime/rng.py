"""Random ops across ranks: dropout, ``rand_like``, ``bernoulli``.

A rank's sharded random op (each rank draws its own part) takes the rank's own stream: the loop
seeds every rank's generators from (seed, step, micro-batch, rank) before each forward
(``seed_step``), so no two ranks draw the same mask for their parts, and a resumed run draws
what the uninterrupted one drew (the streams depend on the step, not on what ran before).

A replicated random op must give every rank the same values: ``replicated_random`` runs it
under a generator seeded from (seed, step, micro-batch, the op's name), the same on every rank
(and again when activation checkpointing recomputes it). CUDA's mapping from random numbers to
elements depends on the GPU model, so on a cluster that mixes models (``on_cpu``) the op runs
on the CPU, whose mapping is the same everywhere, and its result is copied to the device.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

_seed, _step, _micro = 0, 0, 0


def _mix(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def seed_step(seed: int, step: int, rank: int, micro: int = 0) -> None:
    """Seed this rank's generators (CPU and every CUDA device) for micro-batch ``micro`` of ``step``."""
    global _seed, _step, _micro
    _seed, _step, _micro = seed, step, micro
    torch.manual_seed(_mix(seed, step, micro, "rank", rank))


def replicated_random(key: str, op: Any, *args: Any, on_cpu: bool = False, **kwargs: Any) -> Any:
    """``op(*args, **kwargs)`` with the same random values on every rank: ``key`` (the node's
    name) and the step make the seed; ``on_cpu`` draws them on the CPU."""
    devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices[:1]):
        torch.manual_seed(_mix(_seed, _step, _micro, "replicated", key))
        if on_cpu and devices:
            cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
            out = op(*cpu_args, **kwargs)
            return tuple(o.to(devices[0]) for o in out) if isinstance(out, (tuple, list)) else out.to(devices[0])
        return op(*args, **kwargs)

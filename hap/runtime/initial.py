"""The model's initial state, made once and read by slices, so no rank holds the whole model.

Every rank builds the spec's ``model()`` on the meta device (shapes only) and reads its own
shards of the initial values from an *initial-state checkpoint*: one ``model.safetensors`` with
every parameter (each storage once, under its first ``state_dict`` key) and every buffer
(persistent or not, under its ``named_buffers`` name) of ``model()`` built as one device builds
it with ``--seed``, and ``hap-init.json`` saying which seed and plan it was made for. So the
values equal single-device training's start, and each rank reads only its slices, memory-mapped.

Where it comes from:
- ``python train.py --write-init DIR [--seed S]`` (one process, no torchrun) writes it once, for
  a job's nodes to share (a shared file system, or a copy per node); ``torchrun ... train.py
  --init DIR`` reads it. A run with another ``--seed`` refuses it (write one for that seed).
- Without ``--init``, the first process of each node writes one into the node's temporary
  directory in a separate process (its memory is not a rank's), the node's ranks read it, and it
  is removed once they have.

A model whose ``model()`` cannot be built on the meta device is built whole on every rank, as
before, and read from there (``hap.runtime.program.build_model`` says so).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

META = "hap-init.json"
FILE = "model.safetensors"


class InitError(ValueError):
    """An initial-state checkpoint that does not fit this run: what, where, how to fix."""


def write(model: torch.nn.Module, out: str | Path, seed: int, plan_digest: str) -> int:
    """Write ``model``'s initial state to the directory ``out`` (whole or not at all); returns its bytes."""
    from safetensors.torch import save_file

    out = Path(out)
    params = [(k, v) for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.nn.Parameter)]
    tensors = {**each_storage_once(params), **{k: v.detach().contiguous() for k, v in model.named_buffers()}}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / FILE))
    (tmp / META).write_text(json.dumps({"seed": seed, "plan_digest": plan_digest}))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def each_storage_once(items) -> dict[str, torch.Tensor]:
    """``(key, tensor)`` pairs, detached and contiguous, the first key of each storage only: tied
    weights once, as safetensors requires and ``save_pretrained`` writes them."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in items:
        if value.untyped_storage().data_ptr() in seen:
            continue
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value.detach().contiguous()
    return out


def check(directory: str | Path, seed: int, plan_digest: str) -> None:
    """Refuse an initial-state checkpoint of another seed or plan (or none at all)."""
    d = Path(directory)
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, ValueError):
        raise InitError(f"--init {d} holds no initial state ({META} is missing or unreadable); write it with "
                        f"python train.py --write-init {d} --seed {seed}") from None
    if meta.get("seed") != seed:
        raise InitError(f"--init {d} was written with --seed {meta.get('seed')}, this run has --seed {seed}: run with "
                        f"--seed {meta.get('seed')}, or write one for this seed (python train.py --write-init DIR "
                        f"--seed {seed})")
    if meta.get("plan_digest") != plan_digest:
        raise InitError(f"--init {d} was written for another plan (digest {meta.get('plan_digest')}); write it "
                        "again with this train.py (python train.py --write-init DIR)")


def node_directory(seed: int) -> Path:
    """Where a node's first process writes the initial state for this job: the same path on every
    rank of the node, named by torchrun's run id, the rendezvous port, the restart count and the
    node's rank, since two nodes may share one machine's temporary directory (two agents on one
    host, or hap-emulate's namespaces) and a static rendezvous's run id is "none" for every job."""
    parts = [os.environ.get(k, d) for k, d in (("TORCHELASTIC_RUN_ID", "local"), ("MASTER_PORT", "0"),
                                               ("TORCHELASTIC_RESTART_COUNT", "0"), ("GROUP_RANK", "0"))]
    safe = ["".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in part) for part in parts]
    return Path(tempfile.gettempdir()) / f"hap-init-{safe[0]}-{safe[1]}-{safe[2]}-node{safe[3]}-seed{seed}"


def write_in_child(train_py: str, out: Path, seed: int) -> None:
    """Run ``train.py --write-init`` in a process of its own (its memory is not this rank's)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    done = subprocess.run([sys.executable, train_py, "--write-init", str(out), "--seed", str(seed)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise InitError(f"writing the initial state failed: {said}")

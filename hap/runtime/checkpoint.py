"""Sharded, plan-independent checkpoints through ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards, in parallel; nothing is gathered. Layout of ``DIR``:

  DIR/step_000120/            one DCP checkpoint: .metadata and one __<rank>_0.distcp per rank
      hap.pt                  the layout and the run's state (written by rank 0):
                              {"format", "step", "data_position", "optimizer_kind", "plan", "shares",
                               "scaler", "layout": {key: {"shape", "dim", "lengths", "aliases"}},
                               "optimizer": {key: {name: "sharded" | "whole"}}}
  DIR/latest                  the name of the newest complete checkpoint

Tensors are stored under the single-device ``state_dict`` names: ``model/<key>`` for a
replicated tensor (DCP writes one copy), ``model/<key>/<rank>`` for rank ``rank``'s shard of a
sharded one (the layout gives its dim and every rank's length); optimizer state likewise under
``optim/<key>/<name>``. A checkpoint is written to a hidden directory and renamed into place
once complete, then ``latest`` is replaced: a crash mid-write leaves the previous checkpoint
as the latest, never a torn one. Resuming under another plan or number of ranks reads, on each
rank, only the stored shards that overlap its new slice (all of them when the new plan shards
another dim), so ``--resume`` works across plans. ``hap-export`` assembles the whole tensors.
"""
from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

FORMAT = "hap-checkpoint/2"
META = "hap.pt"


class CheckpointError(Exception):
    """A checkpoint cannot be used for this program (another model, a torn directory, ...)."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


def save(directory: str | Path, step: int, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any], rank: int,
         barrier, keep: int = 2) -> Path:
    """Write checkpoint ``step``: every rank calls it with its own ``tensors`` (keys as in the
    module docstring), rank 0 adds ``meta``. ``barrier()`` synchronises the ranks."""
    d = Path(directory)
    name = f"step_{step:06d}"
    tmp = d / f".{name}.tmp"
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while writing
    barrier()
    with warnings.catch_warnings():  # one process (no group) is a legitimate single-rank save
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _dcp().save(dict(tensors), checkpoint_id=str(tmp))
    if rank == 0:
        torch.save({"format": FORMAT, "step": step, **meta}, tmp / META)
        shutil.rmtree(d / name, ignore_errors=True)
        os.replace(tmp, d / name)
        _atomic_write(d / "latest", lambda p: p.write_text(name + "\n"))
        old = sorted(x for x in d.glob("step_*") if x.is_dir())[:-keep] if keep > 0 else []
        for x in old:
            shutil.rmtree(x, ignore_errors=True)
    barrier()
    return d / name


def latest(directory: str | Path) -> Path | None:
    d = Path(directory)
    pointer = d / "latest"
    if not pointer.exists():
        return None
    f = d / pointer.read_text().strip()
    return f if (f / META).exists() else None


def read_meta(path: str | Path) -> dict[str, Any]:
    """The layout and run state of a checkpoint (a step directory, or a --save DIR: its latest)."""
    p = Path(path)
    if p.is_dir() and not (p / META).exists():
        found = latest(p)
        if found is None:
            raise CheckpointError(f"{p} holds no checkpoint (no 'latest' file); start without --resume")
        p = found
    if not (p / META).exists():
        raise CheckpointError(f"{p} is not a hap checkpoint directory (no {META}); give the --save directory "
                              "of a run or one of its step_* directories")
    try:
        meta = torch.load(p / META, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file
        raise CheckpointError(f"{p / META} is not readable: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else "?"
        raise CheckpointError(f"{p} is not a checkpoint of this hap (format {fmt}, expected {FORMAT})")
    meta["path"] = str(p)
    return meta


def check_model(meta: dict[str, Any], shapes: Mapping[str, Sequence[int]]) -> None:
    """Refuse a checkpoint of another model: every planned parameter must be there, same shape."""
    layout = meta["layout"]
    stored = {alias: tuple(e["shape"]) for e in layout.values() for alias in e["aliases"]}
    diff = [k for k, s in shapes.items() if k in stored and stored[k] != tuple(s)]
    diff += [k for k in shapes if k not in stored and k not in meta.get("buffers", {})]
    if diff:
        raise CheckpointError(f"{meta['path']} was written for another model (differs at {', '.join(diff[:3])}); "
                              "resume from a checkpoint of this model or start fresh")


def _ranges(lengths: Sequence[int]) -> list[tuple[int, int]]:
    out, lo = [], 0
    for n in lengths:
        out.append((lo, lo + n))
        lo += n
    return out


def request(prefix: str, stored: Mapping[str, Any], dim: int | None, lengths: Sequence[int] | None,
            rank: int) -> tuple[dict[str, torch.Tensor], Any]:
    """The stored tensors rank ``rank`` needs for its slice (``dim``, ``lengths``; None: whole) of
    the tensor stored under ``prefix`` as ``stored`` = {"shape", "dim", "lengths"}, as empty
    tensors to load into, and a function that makes the slice from them once loaded."""
    shape = list(stored["shape"])
    old_dim, old_lengths = stored["dim"], stored["lengths"]
    dtype = getattr(torch, stored.get("dtype", "float32"))
    if old_dim is None:
        buf = {prefix: torch.empty(shape, dtype=dtype)}
        return buf, lambda: _narrow(buf[prefix], dim, lengths, rank)
    spans = _ranges(old_lengths)
    want = None
    if dim == old_dim:
        want = _ranges(lengths)[rank]
    parts = [r for r, (lo, hi) in enumerate(spans) if hi > lo and (want is None or (lo < want[1] and hi > want[0]))]
    buf = {}
    for r in parts:
        s = list(shape)
        s[old_dim] = old_lengths[r]
        buf[f"{prefix}/{r}"] = torch.empty(s, dtype=dtype)

    def assemble() -> torch.Tensor:
        if not parts:
            s = list(shape)
            s[old_dim] = 0
            return torch.empty(s, dtype=dtype)
        region = torch.cat([buf[f"{prefix}/{r}"] for r in parts], dim=old_dim)
        if want is not None:
            return region.narrow(old_dim, want[0] - spans[parts[0]][0], want[1] - want[0])
        return _narrow(region, dim, lengths, rank)

    return buf, assemble


def _narrow(full: torch.Tensor, dim: int | None, lengths: Sequence[int] | None, rank: int) -> torch.Tensor:
    if dim is None:
        return full
    lo, hi = _ranges(lengths)[rank]
    return full.narrow(dim, lo, hi - lo)


def stored_keys(path: str) -> set[str]:
    """The names of the tensors a checkpoint holds."""
    return set(_dcp().FileSystemReader(path).read_metadata().state_dict_metadata)


def load(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Fill ``tensors`` (every rank its own keys; a rank that needs nothing still takes part in
    the collective load) from the DCP checkpoint at ``path``."""
    _dcp().load(tensors, checkpoint_id=path)


def full_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole single-device state_dict of a checkpoint, assembled from its shards, in one
    process (``hap-export``); and its meta."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = read_meta(path)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(meta["path"], Path(tmp) / "all.pt")
        stored = torch.load(Path(tmp) / "all.pt", map_location="cpu", weights_only=False)
    out: dict[str, torch.Tensor] = {}
    for key, e in meta["layout"].items():
        if e["dim"] is None:
            full = stored[f"model/{key}"]
        else:
            full = torch.cat([stored[f"model/{key}/{r}"] for r, n in enumerate(e["lengths"]) if n], dim=e["dim"])
        for alias in e["aliases"]:
            out[alias] = full
    for key in meta.get("buffers", {}):
        out[key] = stored[f"model/{key}"]
    return out, meta

"""Plan-independent checkpoints for emitted programs.

Layout of ``DIR`` (full tensors under the single-device ``state_dict`` names, so a
checkpoint written by one plan resumes under any other, on any number of ranks):

  DIR/step_000120.pt   {"format", "step", "model": state_dict, "optimizer": {key: {name: tensor}},
                        "optimizer_kind", "rng": torch RNG state, "fingerprint", "plan",
                        "data_position": {"step", and for dataset specs "epoch", "step_in_epoch"},
                        "scaler": fp16 loss-scaler state or None}
  DIR/latest           the file name of the newest complete checkpoint

Each file is written to a temporary name in DIR and renamed into place (atomic on POSIX),
and ``latest`` is updated the same way afterwards: a crash mid-write leaves the previous
checkpoint as the latest, never a torn one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "hap-checkpoint/1"


class CheckpointError(Exception):
    """A checkpoint cannot be used for this program (another model, a torn directory, ...)."""


def fingerprint(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in state_dict.items()]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(directory: str | Path, step: int, model_state: dict, optimizer_state: dict, optimizer_kind: str,
         plan_digest: str, keep: int = 2, scaler: dict | None = None, data_position: dict | None = None) -> Path:
    """Write checkpoint ``step`` (call on one rank only) and point ``latest`` at it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}.pt"
    payload: dict[str, Any] = {
        "format": FORMAT, "step": step, "data_position": data_position or {"step": step}, "model": model_state,
        "optimizer": optimizer_state, "optimizer_kind": optimizer_kind, "rng": torch.get_rng_state(),
        "fingerprint": fingerprint(model_state), "plan": plan_digest,
        "scaler": scaler,
    }
    _atomic_write(d / name, lambda p: torch.save(payload, p))
    _atomic_write(d / "latest", lambda p: p.write_text(name + "\n"))
    old = sorted(d.glob("step_*.pt"))[:-keep] if keep > 0 else []
    for f in old:
        f.unlink(missing_ok=True)
    return d / name


def latest(directory: str | Path) -> Path | None:
    d = Path(directory)
    pointer = d / "latest"
    if not pointer.exists():
        return None
    f = d / pointer.read_text().strip()
    return f if f.exists() else None


def load(path: str | Path, model_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Load a checkpoint file (or the latest in a directory) and check it fits ``model_state``."""
    p = Path(path)
    if p.is_dir():
        f = latest(p)
        if f is None:
            raise CheckpointError(f"{p} holds no checkpoint (no 'latest' file); start without --resume")
        p = f
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # torn or foreign file
        raise CheckpointError(f"{p} is not a readable hap checkpoint: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        fmt = ck.get('format') if isinstance(ck, dict) else '?'
        raise CheckpointError(f"{p} is not a hap checkpoint (format {fmt})")
    want = fingerprint(model_state)
    if [tuple(x) for x in ck["fingerprint"]] != [(k, list(s)) for k, s in want]:
        theirs = {k: s for k, s in ck["fingerprint"]}
        ours = dict(want)
        diff = sorted(set(theirs) ^ set(ours))[:3] or \
            [k for k in ours if k in theirs and list(theirs[k]) != list(ours[k])][:3]
        raise CheckpointError(f"{p} was written for another model (differs at {', '.join(diff) or 'key order'}); "
                              "resume from a checkpoint of this model or start fresh")
    ck["path"] = str(p)
    return ck

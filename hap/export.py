"""``hap-export``: a hap checkpoint as the single-device model's ``state_dict`` in safetensors,
for use outside hap (``transformers``' ``from_pretrained`` reads the same format).

    hap-export CKPT --out model.safetensors     # CKPT: a step_* directory, or a --save DIR (its newest)

Checkpoints hold each rank's shards under the single-device names (``hap.runtime.checkpoint``);
exporting assembles the whole tensors in one process, reading them straight from the checkpoint
into tensors allocated from its layout. The export holds what the model's ``state_dict()`` holds:
the parameters and the persistent buffers, so ``load_state_dict(strict=True)`` accepts it.
Tensors that share storage (tied weights) are written as separate copies, as safetensors
requires; loading them back ties nothing.

Nothing in a checkpoint runs as code: ``hap.json`` is JSON, DCP reads each tensor with
``weights_only``, and DCP's ``.metadata`` (a pickle) is read only when it is the user's own or
``--trust-checkpoint`` says so. ``--out`` is replaced whole or not at all.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from hap.errors import HapError
from hap.runtime import checkpoint as ckpt


class ExportError(HapError):
    """The export cannot be written (no safetensors package, --out not writable, disk full, ...)."""


def full_state(path: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The single-device ``state_dict`` of checkpoint ``path`` (a step directory, or a --save DIR:
    its newest complete checkpoint), assembled from its shards in one process; and its meta.
    ``trust``: load DCP's ``.metadata`` even when another user owns it (``ckpt.check_trusted``)."""
    meta = ckpt.read_meta(path)
    wanted: dict[str, torch.Tensor] = {}
    assemble: list[tuple[list[str], Any]] = []
    for key, e in meta["layout"].items():
        buf, make = ckpt.request(f"model/{key}", e, None, None, 0)
        wanted.update(buf)
        assemble.append((e["aliases"], make))
    for key, e in meta.get("buffers", {}).items():
        # a non-persistent buffer (Llama's rotary inv_freq) is not in state_dict(), so not in the
        # export; a checkpoint that does not record persistence (older ones) keeps every buffer
        if not e.get("persistent", True):
            continue
        buf, make = ckpt.request(f"model/{key}", e, None, None, 0)
        wanted.update(buf)
        assemble.append(([key], make))
    ckpt.load(meta["path"], wanted, trust)
    out: dict[str, torch.Tensor] = {}
    for aliases, make in assemble:
        full = make()
        for alias in aliases:
            out[alias] = full
    return out, meta


def write(tensors: dict[str, torch.Tensor], out: str | Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` to the safetensors file ``out`` (whole or not at all: ``checkpoint.atomic_write``); an
    I/O error becomes an ExportError that says what to do."""
    save_file, SafetensorError = _safetensors()
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except OSError as e:
        raise ExportError(_write_message(out, e)) from None
    except SafetensorError as e:  # its I/O errors carry the OS error's number in the text
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise ExportError(f"writing {out} failed: {e}") from None
        raise ExportError(_write_message(out, OSError(int(code.group(1)), os.strerror(int(code.group(1)))))) from None


def _safetensors():
    """safetensors' ``save_file`` and its error type; the package is an optional dependency."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import save_file
    except ImportError:
        raise ExportError("writing safetensors needs the safetensors package: pip install safetensors "
                          "(or pip install 'hap[export]')") from None
    return save_file, SafetensorError


def _write_message(out: Path, e: OSError) -> str:
    where = out.parent
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"no space left on the disk holding {where} (or over quota); free some, or give an --out on another disk"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"you cannot write in {where}; give an --out in a directory you can write"
    elif e.errno == errno.EISDIR:
        why = f"it is a directory; give a file name, e.g. --out {out / 'model.safetensors'}"
    elif e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST):
        why = f"{where} is not a directory that can hold it; give an --out whose parent is a directory"
    else:
        why = e.strerror or str(e)
    unchanged = f"; {out} is unchanged" if out.is_file() else ""
    return f"cannot write {out}: {why}{unchanged}"


def export(path: str | Path, out: str | Path, trust: bool = False) -> dict[str, tuple[int, ...]]:
    """Write checkpoint ``path``'s single-device ``state_dict`` to ``out``; returns each tensor's shape."""
    _safetensors()  # before the checkpoint is read, not after
    state, meta = full_state(path, trust=trust)
    return _write_state(state, meta, out)


def _write_state(state: dict[str, torch.Tensor], meta: dict[str, Any], out: str | Path) -> dict[str, tuple[int, ...]]:
    tensors, seen = {}, set()
    for k, v in state.items():
        v = v.detach().contiguous()
        if v.untyped_storage().data_ptr() in seen:  # a tied weight's second name: its own copy
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    write(tensors, out, {"format": "pt", "source": f"hap checkpoint {Path(meta['path']).name}",
                         "step": str(meta["step"])})
    return {k: tuple(v.shape) for k, v in tensors.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hap-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint (a step_* directory) or a --save directory (its newest "
                                       "complete checkpoint)")
    ap.add_argument("--out", required=True, help="the .safetensors file to write (replaced whole or not at all)")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="the .metadata of a DCP checkpoint is a Python pickle and loading it runs code; pass this "
                         "only for a checkpoint you trust like code, e.g. one another user wrote")
    args = ap.parse_args(argv)
    try:
        _safetensors()  # before the checkpoint is read, not after
        state, meta = full_state(args.checkpoint, trust=args.trust_checkpoint)
        if meta.get("note"):
            print(f"hap-export: {meta['note']}", file=sys.stderr)
        shapes = _write_state(state, meta, args.out)
    except (ckpt.CheckpointError, ExportError) as e:
        print(f"hap-export: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # reading the checkpoint: writing --out says its own
        print(f"hap-export: cannot read {e.filename or args.checkpoint}: {e.strerror or e}; check that the "
              "checkpoint exists and that you can read it", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: the {len(shapes)} tensors of the single-device state_dict")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``hap-export``: a hap checkpoint as the single-device model's ``state_dict`` in safetensors,
for use outside hap (``transformers``' ``from_pretrained`` reads the same format).

    hap-export CKPT --out model.safetensors     # CKPT: a step_* directory, or a --save DIR (its newest)
    hap-export CKPT --hf DIR --spec SPEC        # a HuggingFace model directory: from_pretrained(DIR) loads it

Checkpoints hold each rank's shards under the single-device names (``hap.runtime.checkpoint``);
exporting assembles the whole tensors in one process, reading them straight from the checkpoint
into tensors allocated from its layout. The export holds what the model's ``state_dict()`` holds:
the parameters and the persistent buffers, so ``load_state_dict(strict=True)`` accepts it.
Tensors that share storage (tied weights) are written as separate copies, as safetensors
requires; loading them back ties nothing.

``--hf DIR`` writes the HuggingFace model inside the spec's ``model()`` as ``save_pretrained``
would: its tensors without the spec's prefix (``PRETRAINED_PREFIX``, or the path of the first
``transformers.PreTrainedModel`` inside ``model()``), tied weights once, in safetensors shards of
at most ``--max-shard-size`` with ``model.safetensors.index.json`` (one ``model.safetensors`` where
it fits), and the config: ``PRETRAINED``'s ``config.json`` (and ``generation_config.json``), or the
model's own ``config``. The spec is the user's code, named on the command line; the checkpoint
never says what to import. ``DIR`` must not exist or be empty, and is written whole or not at all.

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
from hap.runtime.initial import each_storage_once


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


def hf_model_of(spec_path: str):
    """(the HuggingFace model inside the spec's ``model()``, built on the meta device; its prefix
    in ``model()``'s state_dict; the spec's PRETRAINED directory or None)."""
    from hap.spec import build, load_spec

    mod = load_spec(spec_path)
    model, _ = build(mod, meta=True)
    try:
        from transformers import PreTrainedModel
    except ImportError:
        raise ExportError("--hf needs transformers: pip install 'hap[hf]'") from None
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, PreTrainedModel)]
    prefix = getattr(mod, "PRETRAINED_PREFIX", None)
    if prefix is None:
        if not found:
            raise ExportError(f"{spec_path}: model() holds no transformers model, so there is nothing for "
                              "from_pretrained to load; export with --out instead")
        prefix = found[0][0] + "." if found[0][0] else ""
    hf = next((m for name, m in found if (name + "." if name else "") == prefix), None)
    if hf is None:
        raise ExportError(f"{spec_path}: PRETRAINED_PREFIX {prefix!r} names no transformers model inside model() "
                          f"(found: {', '.join(repr(n + '.') for n, _ in found) or 'none'})")
    return hf, prefix, getattr(mod, "PRETRAINED", None)


def hf_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """The tensors in files of at most ``max_bytes`` each (a larger tensor alone), in key order."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        n = state[k].numel() * state[k].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += n
    return shards


def export_hf(path: str | Path, out: str | Path, spec_path: str, trust: bool = False,
              max_shard_bytes: int = 5 * 2**30) -> int:
    """Write checkpoint ``path``'s HuggingFace model (the one inside the spec's ``model()``) to the
    directory ``out`` as ``save_pretrained`` would; returns the number of tensors written."""
    import json
    import shutil

    save_file, _ = _safetensors()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; give a new --hf directory (nothing in "
                          f"{out} is changed)")
    hf, prefix, pretrained = hf_model_of(spec_path)
    state, meta = full_state(path, trust=trust)
    # the HF model's tensors, tied weights once as save_pretrained writes them
    tensors = each_storage_once((k[len(prefix):], state[k]) for k in sorted(state) if k.startswith(prefix))
    if not tensors:
        raise ExportError(f"checkpoint {meta['path']} holds no tensor under {prefix!r}; is it this spec's model?")
    shards = hf_shards(tensors, max_shard_bytes)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        info = {"format": "pt", "source": f"hap checkpoint {Path(meta['path']).name}", "step": str(meta["step"])}
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata=info)
        if len(shards) > 1:
            weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if pretrained and (Path(pretrained) / "config.json").is_file():
            for name in ("config.json", "generation_config.json"):
                if (Path(pretrained) / name).is_file():
                    shutil.copyfile(Path(pretrained) / name, tmp / name)
        else:
            hf.config.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(_write_message(out / "model.safetensors", e)) from None
    return len(tensors)


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 100KB")
    unit = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}[m.group(2)]
    return int(float(m.group(1)) * unit)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hap-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint (a step_* directory) or a --save directory (its newest "
                                       "complete checkpoint)")
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="the .safetensors file to write (replaced whole or not at all)")
    target.add_argument("--hf", metavar="DIR", help="a HuggingFace model directory to write (sharded safetensors, "
                                                    "index and config; from_pretrained(DIR) loads it); needs --spec")
    ap.add_argument("--spec", help="with --hf: the model spec the checkpoint trained (its model() holds the "
                                   "HuggingFace model; PRETRAINED gives the config)")
    ap.add_argument("--max-shard-size", type=_size, default=5 * 2**30, metavar="SIZE",
                    help="with --hf: the largest safetensors file (default 5GB, as transformers writes)")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="the .metadata of a DCP checkpoint is a Python pickle and loading it runs code; pass this "
                         "only for a checkpoint you trust like code, e.g. one another user wrote")
    args = ap.parse_args(argv)
    if args.hf and not args.spec:
        ap.error("--hf needs --spec SPEC: the spec whose model() holds the HuggingFace model")
    try:
        _safetensors()  # before the checkpoint is read, not after
        if args.hf:
            from hap.errors import SpecError

            try:
                count = export_hf(args.checkpoint, args.hf, args.spec, args.trust_checkpoint, args.max_shard_size)
            except SpecError as e:
                raise ExportError(f"{args.spec}: {e}") from None
            print(f"wrote {args.hf}: the HuggingFace model's {count} tensors and its config; "
                  f"AutoModelForCausalLM.from_pretrained({args.hf!r}) loads it")
            return 0
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

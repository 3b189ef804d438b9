"""The model spec protocol: a Python file defining ``model()``, ``BATCH_SIZE`` and its data,
either ``batch(step, batch_size)`` or ``dataset(split)`` (a map-style torch Dataset for
"train" and "val", with an optional ``collate(samples)``; docs/data.md). Loading it turns
every mistake into a ``SpecError`` that says what is missing and how to fix it."""
from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from hap.errors import SpecError

PROTOCOL = ("a spec file defines model() -> nn.Module whose forward(*batch) returns the loss, "
            "BATCH_SIZE = int, and either batch(step, batch_size) -> tuple of tensors (see examples/mlp.py) "
            "or dataset(split) -> torch.utils.data.Dataset for 'train' and 'val' (see examples/chargpt.py)")


def load_spec(path: str | Path) -> ModuleType:
    p = Path(path)
    if not p.exists():
        raise SpecError(f"model spec {path} does not exist; {PROTOCOL}")
    if not p.is_file() or p.suffix != ".py":
        raise SpecError(f"model spec {path} is not a .py file; {PROTOCOL}")
    name = f"hap_spec_{p.stem}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot read model spec {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(p.resolve().parent))
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{fr.filename}:{fr.lineno}" for fr in reversed(tb) if fr.filename == str(p)), str(path))
        raise SpecError(f"model spec {path} failed to import at {where}: {type(e).__name__}: {e}") from e
    missing = [n for n in ("model", "BATCH_SIZE") if not hasattr(mod, n)]
    if not hasattr(mod, "batch") and not hasattr(mod, "dataset"):
        missing.append("batch or dataset")
    if missing:
        raise SpecError(f"model spec {path} lacks {', '.join(missing)}; {PROTOCOL}")
    data = mod.dataset if hasattr(mod, "dataset") else mod.batch
    if not callable(mod.model) or not callable(data):
        raise SpecError(f"model spec {path}: model and {data.__name__} must be functions; {PROTOCOL}")
    if not isinstance(mod.BATCH_SIZE, int) or mod.BATCH_SIZE < 1:
        raise SpecError(f"model spec {path}: BATCH_SIZE must be a positive int, not {mod.BATCH_SIZE!r}")
    return mod


def build(mod: ModuleType, batch_size: int | None = None, seed: int = 0, meta: bool = False):
    """``(model, example batch)`` from a loaded spec, with the errors of user code explained.

    ``meta=True`` builds the model and batch on the meta device (shapes only, no memory, no
    initialisation time): enough to capture and plan a model of any size. A model whose
    constructor cannot run on meta is built on the CPU instead.
    """
    import torch

    bs = batch_size or mod.BATCH_SIZE
    torch.manual_seed(seed)
    model = None
    if meta:
        try:
            with torch.device("meta"):
                model = mod.model()
        except Exception:
            model = None
    try:
        model = model if model is not None else mod.model()
    except Exception as e:
        raise SpecError(f"model() raised {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"model() returned a {type(model).__name__}, not a torch.nn.Module")
    batch = example_batch(mod, bs)
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if not isinstance(batch, (tuple, list)) or not all(isinstance(b, torch.Tensor) for b in batch):
        raise SpecError("batch(step, batch_size) must return a tuple of tensors")
    for i, b in enumerate(batch):
        if b.ndim == 0 or b.shape[0] != bs:
            raise SpecError(f"batch tensor {i} has shape {tuple(b.shape)}; dim 0 must be the {bs} samples")
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta:
        batch = [b.to("meta") for b in batch]
    return model, tuple(batch)


def example_batch(mod: ModuleType, bs: int):
    """The first global batch: ``batch(0, bs)``, or the collated first ``bs`` items of the
    documented order of ``dataset("train")`` (epoch 0 of seed 0)."""
    import torch

    if not hasattr(mod, "dataset"):
        try:
            return mod.batch(0, bs)
        except Exception as e:
            raise SpecError(f"batch(0, {bs}) raised {type(e).__name__}: {e}") from e
    try:
        ds = mod.dataset("train")
        n = len(ds)
    except Exception as e:
        raise SpecError(f"dataset('train') raised {type(e).__name__}: {e}") from e
    if n < bs:
        raise SpecError(f"dataset('train') has {n} items, fewer than one global batch of {bs}; "
                        "give a smaller --batch-size")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:bs].tolist()
    collate = getattr(mod, "collate", None) or torch.utils.data.default_collate
    try:
        return collate([ds[i] for i in idx])
    except Exception as e:
        raise SpecError(f"collating {bs} items of dataset('train') raised {type(e).__name__}: {e}; a dataset "
                        "item is a tuple of tensors (or give the spec a collate(samples))") from e


def capture_spec(mod: ModuleType, batch_size: int | None = None):
    """The spec's model captured into a Graph: on the meta device (no memory), or on the CPU
    for a model that only traces with real values."""
    from hap.capture import capture
    from hap.errors import CaptureError

    model, batch = build(mod, batch_size, meta=True)
    try:
        return capture(model, batch, name=type(model).__name__)
    except CaptureError:
        if not any(p.is_meta for p in model.parameters()):
            raise
    model, batch = build(mod, batch_size)
    return capture(model, batch, name=type(model).__name__)

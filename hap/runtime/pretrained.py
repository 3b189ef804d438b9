"""Pretrained weights by slices: a spec's ``PRETRAINED`` names a local HuggingFace checkpoint
directory (``model.safetensors``, or shards listed in ``model.safetensors.index.json``), and
``PRETRAINED_PREFIX`` where the HuggingFace model sits inside ``model()`` (``"m."`` for
``self.m = AutoModel...``). On one device that means: build ``model()``, then load the
directory's tensors under the prefix. Here each rank reads only the slice of each parameter it
holds, through safetensors' memory-mapped ``get_slice``, so a rank never reads the bytes of
another rank's shards. Tied weights (one placeholder, several keys) are read once.

``read_bytes`` counts the bytes a rank read (``--log-json``'s ``pretrained_read_bytes``, by rank),
and ``casts`` the dtype conversions a checkpoint needed (said once when training starts).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


class PretrainedError(ValueError):
    """A checkpoint that does not fit the planned model: what, where, how to fix."""


class Pretrained:
    def __init__(self, directory: str | Path, prefix: str = "") -> None:
        self.dir, self.prefix = Path(directory), prefix
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            self.files = None  # one file: its keys are read when opened
        else:
            raise PretrainedError(f"PRETRAINED {self.dir} has neither model.safetensors nor "
                                  "model.safetensors.index.json; point it at a directory save_pretrained wrote")
        self._open: dict[Path, object] = {}
        self._keys: set[str] | None = None
        self.read_bytes = 0
        self.casts: set[tuple[str, str]] = set()

    def _handle(self, path: Path):
        if path not in self._open:
            try:
                from safetensors import safe_open
            except ImportError as e:
                raise PretrainedError("PRETRAINED needs safetensors: pip install safetensors") from e
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def keys(self) -> set[str]:
        """The checkpoint's keys (read once: every parameter asks)."""
        if self._keys is None:
            self._keys = set(self.files) if self.files is not None else \
                set(self._handle(self.dir / "model.safetensors").keys())
        return self._keys

    def key_of(self, state_keys: tuple[str, ...]) -> str:
        """The checkpoint key of a parameter known by ``state_keys`` (tied weights: any of them)."""
        have = self.keys()
        for k in state_keys:
            if k.startswith(self.prefix) and k[len(self.prefix):] in have:
                return k[len(self.prefix):]
        raise PretrainedError(
            f"PRETRAINED {self.dir} has no tensor for {' / '.join(state_keys)} (looked for "
            f"{', '.join(repr(k[len(self.prefix):]) for k in state_keys if k.startswith(self.prefix)) or 'nothing'}"
            f" under PRETRAINED_PREFIX {self.prefix!r}); set PRETRAINED_PREFIX to where the HuggingFace model "
            "sits inside model() (e.g. 'm.' for self.m), or check that the checkpoint is this model's")

    def read(self, state_keys: tuple[str, ...], shape: tuple[int, ...], dtype: torch.dtype,
             dim: int | None, start: int, length: int) -> torch.Tensor:
        """This rank's slice ``[start, start + length)`` on ``dim`` (the whole tensor where ``dim``
        is None) of the parameter known by ``state_keys``, whose full shape must be ``shape``."""
        key = self.key_of(state_keys)
        path = self.files[key] if self.files is not None else self.dir / "model.safetensors"
        sl = self._handle(path).get_slice(key)
        have = tuple(sl.get_shape())
        if have != tuple(shape):
            raise PretrainedError(f"PRETRAINED {path.name}: {key} is {list(have)}, the planned model's "
                                  f"{state_keys[0]} is {list(shape)}; the checkpoint is another size of model")
        if dim is None:  # whole (a 0-dim tensor, BatchNorm's count, cannot be sliced)
            t = self._handle(path).get_tensor(key)
        else:
            index = tuple(slice(None) if d != dim else slice(start, start + length) for d in range(len(shape)))
            t = sl[index]
        self.read_bytes += t.numel() * t.element_size()
        if t.dtype != dtype:
            self.casts.add((str(t.dtype).removeprefix("torch."), str(dtype).removeprefix("torch.")))
            t = t.to(dtype)
        return t

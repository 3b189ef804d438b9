"""``hap-export``: a hap checkpoint as the single-device model's ``state_dict`` in safetensors,
for use outside hap (``transformers``' ``from_pretrained`` reads the same format).

    hap-export CKPT --out model.safetensors     # CKPT: a step_* directory, or a --save DIR (its latest)

Checkpoints hold each rank's shards under the single-device names (``hap.runtime.checkpoint``);
exporting assembles the whole tensors in one process. Tensors that share storage (tied weights) are written as
separate copies, as safetensors requires; loading them back ties nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hap.runtime import checkpoint as ckpt


def export(path: str | Path, out: str | Path) -> dict[str, tuple[int, ...]]:
    """Write checkpoint ``path``'s model state to ``out``; returns each tensor's shape."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise SystemExit("hap-export: writing safetensors needs the safetensors package: "
                         "pip install safetensors") from None
    state, meta = ckpt.full_state(path)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt", "source": f"hap checkpoint {Path(meta['path']).name}",
                                           "step": str(meta["step"])})
    return {k: tuple(v.shape) for k, v in tensors.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hap-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint (a step_* directory) or a --save directory (its latest)")
    ap.add_argument("--out", required=True, help="the .safetensors file to write")
    args = ap.parse_args(argv)
    try:
        shapes = export(args.checkpoint, args.out)
    except ckpt.CheckpointError as e:
        print(f"hap-export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: the {len(shapes)} tensors of the single-device state_dict")
    return 0


if __name__ == "__main__":
    sys.exit(main())

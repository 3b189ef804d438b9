"""How far two legitimate orders of the same sums drift apart under autocast, on one device.

    python benchmarks/precision_drift.py examples/gpt.py 10,5,1 bf16 [--lr 0.05] [--steps 3]

Trains the spec on one device twice for a few SGD steps: once on the whole global batch, once
on the same batch cut into micro-batches of the given sizes (gradient accumulation, each
micro-batch's loss weighted by its share). A data-parallel plan with these shares computes
exactly the second; prints the largest relative parameter difference between the two (per
tensor, max |a - b| / max |b|). This is the yardstick for the tolerance of docs/precision.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("shares", help="micro-batch sizes, e.g. 10,5,1")
    ap.add_argument("precision", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    loader = importlib.util.spec_from_file_location("spec", args.spec)
    spec = importlib.util.module_from_spec(loader)
    sys.path.insert(0, str(Path(args.spec).resolve().parent))
    loader.loader.exec_module(spec)
    shares = [int(x) for x in args.shares.split(",")]
    gb = sum(shares)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def train(parts: list[int]) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = spec.model()
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        for step in range(args.steps):
            full = spec.batch(step, gb)
            opt.zero_grad()
            lo = 0
            for n in parts:
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = model(*[x[lo:lo + n] for x in full]) * (n / gb)
                loss.backward()
                lo += n
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    whole, parts = train([gb]), train(shares)
    err = max(float((whole[k] - parts[k]).abs().max() / (parts[k].abs().max() + 1e-6))
              for k in whole if whole[k].is_floating_point())
    worst = max((k for k in whole if whole[k].is_floating_point()),
                key=lambda k: float((whole[k] - parts[k]).abs().max() / (parts[k].abs().max() + 1e-6)))
    print(f"{args.precision} {args.spec} micro-batches {shares}: max relative parameter difference {err:.2e} ({worst}) "
          f"after {args.steps} steps")


if __name__ == "__main__":
    main()

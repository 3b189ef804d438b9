"""Benchmark (e): examples/dlrm.py trained by its emitted program in bf16 and in fp32.

    HAP_BATCH=256 python benchmarks/dlrm_precision.py [--cluster profiles/clusters/default.toml] \
        [--steps 300] [--lr 0.1] [--plot docs/dlrm-bf16.png]

Plans the DLRM example for the cluster twice (--precision fp32 and bf16), emits both programs,
trains each for ``steps`` steps under torchrun (same seed, same batches) and compares the two
loss curves: the largest per-step relative difference, and the largest difference of their
20-step moving averages (the per-step noise of a small batch averaged out). Draws both curves
and the relative difference to ``--plot``. Exits 1 when a step differs by more than TOLERANCE.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, plan_and_emit, torchrun

WINDOW = 20
TOLERANCE = 0.01  # per step: |bf16 - fp32| / fp32


def moving(xs: list[float], w: int) -> list[float]:
    return [sum(xs[i - w:i]) / w for i in range(w, len(xs) + 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", default=str(ROOT / "profiles/clusters/default.toml"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    spec = str(ROOT / "examples/dlrm.py")
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            out = Path(tmp) / precision
            plan = plan_and_emit(spec, args.cluster, out, precision)
            torchrun(plan.num_ranks, out / "train.py", ["--steps", str(args.steps), "--lr", str(args.lr),
                                                        "--log-json", str(out / "log.json")])
            log = json.loads((out / "log.json").read_text())
            assert log["precision"] == precision
            curves[precision] = [float(x) for x in log["losses"]]
            print(f"{precision}: shares {list(plan.shares)}, loss {curves[precision][0]:.4f} -> "
                  f"{curves[precision][-1]:.4f}", flush=True)
    a, b = curves["fp32"], curves["bf16"]
    rel = [abs(y - x) / abs(x) for x, y in zip(a, b)]
    ma, mb = moving(a, WINDOW), moving(b, WINDOW)
    rel_ma = max(abs(y - x) / abs(x) for x, y in zip(ma, mb))
    med = sorted(rel)[len(rel) // 2]
    print(f"{args.steps} steps: max per-step |bf16 - fp32| / fp32 = {max(rel):.2%} (median {med:.2%}); "
          f"{WINDOW}-step moving averages differ by at most {rel_ma:.2%}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
        top.plot(a, label="fp32", linewidth=1)
        top.plot(b, label="bf16 autocast", linewidth=1, alpha=0.8)
        top.set_ylabel("training loss")
        top.set_title(f"examples/dlrm.py, {Path(args.cluster).stem} cluster, lr {args.lr}")
        top.legend()
        bottom.plot([100 * r for r in rel], color="gray", linewidth=0.8)
        bottom.set_ylabel("|bf16 - fp32| / fp32, %")
        bottom.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    if max(rel) > TOLERANCE:
        print(f"FAIL: the bf16 curve leaves the {TOLERANCE:.0%} tolerance of the fp32 curve")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's "train on your data" example, trained: examples/chargpt.py's loss curve.

    python benchmarks/chargpt_curve.py [--cluster profiles/clusters/default.toml] [--steps 300] \
        [--precision auto] [--plot docs/chargpt-loss.png]

Plans the character-level GPT (a dataset spec: Python's own sources, no download), emits
train.py, trains it under torchrun with Adam and validation every 50 steps, prints the first
and last losses, the validation losses and the data-wait share of the step, and draws the
training and validation curves. Exits 1 unless the last validation loss is below 60% of a
uniform guess over the 128 characters (ln 128 = 4.85 nats).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, plan_and_emit, torchrun


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", default=str(ROOT / "profiles/clusters/default.toml"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        plan = plan_and_emit(str(ROOT / "examples/chargpt.py"), args.cluster, out, args.precision)
        torchrun(plan.num_ranks, out / "train.py", ["--steps", str(args.steps), "--optimizer", "adam", "--lr",
                                                    str(args.lr), "--eval-every", "50", "--log-json",
                                                    str(out / "log.json")])
        log = json.loads((out / "log.json").read_text())
    losses, val = log["losses"], log["val_losses"]
    wait = sum(log["data_wait_s"]) / sum(log["step_s"])
    vals = ", ".join(f"{v['step']}: {v['loss']:.3f}" for v in val)
    print(f"plan: shares {list(plan.shares)}, {plan.precision}; train loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"val loss {vals}; data wait {wait:.1%} of the steps")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(range(1, len(losses) + 1), losses, linewidth=0.8, label="train (per step)")
        ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats per character)")
        ax.set_title(f"examples/chargpt.py on {Path(args.cluster).stem} ({plan.precision}, shares "
                     f"{':'.join(map(str, plan.shares))}), Adam lr {args.lr}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    return 0 if val and val[-1]["loss"] < 0.6 * math.log(128) else 1


if __name__ == "__main__":
    sys.exit(main())

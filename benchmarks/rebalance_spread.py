"""Benchmark (e): the same plan, back-to-back runs with and without run-time re-balancing.

    HAP_MLP_WIDTH=1024 HAP_MLP_BATCH=1024 python benchmarks/rebalance_spread.py examples/mlp.py \
        [--cluster profiles/clusters/default.toml] [--runs 6] [--steps 24]

Plans once, then alternates `runs` times: the emitted program with --no-rebalance and with
re-balancing (the default), both under --emulate. Prints each run's median step time over its
last half (and, for the re-balanced runs, the median of its first 4 steps, still on the plan's
shares), then the spread (min, median, max) of each kind. With --slowdown-at the runs also see
a rank slow down mid-run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_avg, plan_and_emit, torchrun


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--cluster", default="profiles/clusters/default.toml")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--slowdown-at", default=None, metavar="STEP:RANK:FACTOR")
    args = ap.parse_args()
    extra = ["--slowdown-at", args.slowdown_at] if args.slowdown_at else []
    kinds = {"static": [], "rebalanced": []}
    first = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        plan = plan_and_emit(args.spec, args.cluster, out)
        print(f"plan: shares {list(plan.shares)}, predicted {plan.predicted_step_s * 1e3:.1f} ms; "
              f"load average {load_avg()}", flush=True)
        for i in range(args.runs):
            for kind, flags in (("static", ["--no-rebalance"]), ("rebalanced", [])):
                log = Path(tmp) / f"{kind}{i}.json"
                torchrun(plan.num_ranks, out / "train.py", ["--steps", str(args.steps), "--lr", "1e-3", "--emulate",
                                                            *extra, *flags, "--log-json", str(log)])
                d = json.loads(log.read_text())
                s = d["step_s"]
                kinds[kind].append(statistics.median(s[len(s) // 2:]))
                moved = [e["shares"] for e in d.get("rebalance", [])]
                if kind == "rebalanced":
                    first.append(statistics.median(s[1:5]))
                print(f"run {i} {kind:10s}: {kinds[kind][-1] * 1e3:6.1f} ms (last {len(s) - len(s) // 2} steps)"
                      + (f"; first steps {first[-1] * 1e3:.1f} ms, shares moved to {moved}" if kind == "rebalanced"
                         else "") + f"; load {load_avg()}", flush=True)
    for kind, xs in kinds.items():
        print(f"{kind:10s}: min {min(xs) * 1e3:.1f}  median {statistics.median(xs) * 1e3:.1f}  "
              f"max {max(xs) * 1e3:.1f} ms")
    print(f"rebalanced runs, first steps on the plan's shares: median {statistics.median(first) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

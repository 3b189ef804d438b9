"""Benchmark (f): what the memory levers cost: micro-batches and activation checkpointing.

    python benchmarks/memory_levers.py examples/gpt.py [--cluster profiles/clusters/default.toml]
        [--micro 1,2,4] [--steps 12] [--out table.md]

Plans the spec twice (blocks kept, every block recomputed), then runs each emitted program under
--emulate with --micro-batches K for every K, alternating the two programs, and prints the median
step time (the first 2 steps skipped) beside the cost model's prediction for the same
micro-batches and blocks (``hap.cost.CostModel`` on the plan's own placements).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_avg, median, print_table, steady, torchrun


def predicted_s(plan, micro: int) -> float:
    """The plan's step time with ``micro`` micro-batches on every rank, by the planner's cost model."""
    from hap.cost import CostModel
    from hap.placement import Splitter
    from hap.solve import evaluate

    cm = CostModel(plan.graph, plan.cluster, Splitter(plan.shares), plan.optimizer, (micro,) * plan.num_ranks,
                   plan.recompute)
    return evaluate(plan.graph, cm, plan.choice()).step_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--cluster", default="profiles/clusters/default.toml")
    ap.add_argument("--micro", default="1,2,4")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from hap.api import plan_spec
    from hap.emit import emit_program

    counts = [int(x) for x in args.micro.split(",")]
    rows = ["| blocks | micro-batches | measured step | predicted step |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        plans = {}
        for mode in ("none", "all"):
            plans[mode] = plan_spec(args.spec, args.cluster, recompute=mode)
            emit_program(plans[mode], Path(tmp) / mode, spec=args.spec, force=True)
        print(f"plans: shares {list(plans['none'].shares)}, blocks {list(plans['all'].recompute)}; "
              f"load average {load_avg()}", flush=True)
        for k in counts:
            for mode, plan in plans.items():
                log = Path(tmp) / f"{mode}{k}.json"
                torchrun(plan.num_ranks, Path(tmp) / mode / "train.py",
                         ["--steps", str(args.steps), "--emulate", "--no-rebalance", "--micro-batches", str(k),
                          "--log-json", str(log)])
                got, want = median(steady(log)), predicted_s(plan, k)
                kept = "kept" if mode == "none" else "all recomputed"
                print(f"{kept:15s} micro-batches {k}: {got * 1e3:7.1f} ms (predicted {want * 1e3:.1f}); "
                      f"load {load_avg()}", flush=True)
                rows.append(f"| {kept} | {k} | {got * 1e3:.1f} ms | {want * 1e3:.1f} ms |")
    return print_table(rows, args.out)


if __name__ == "__main__":
    sys.exit(main())

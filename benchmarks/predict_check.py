"""Benchmark (h, measured): the planner's memory and step predictions against a run.

    HAP_HF_MODEL=llama HAP_HF_SIZE=small python benchmarks/predict_check.py examples/hf_usage.py \
        [--cluster profiles/clusters/cpu-homogeneous.toml] [--optimizer adamw] [--precision fp32|bf16]
        [--steps 8] [--out table.md]

Plans the spec, emits it, runs it under torchrun on this machine (``--no-rebalance``) and prints
per rank the predicted memory by part beside the measured memory, and the predicted step beside
the measured median (the first 2 steps skipped). The measured memory of the steps is each
rank's ``peak_memory_bytes`` less its ``start_memory_bytes`` (``--log-json``): what the steps
add to the process once the model's state is in place, which the prediction's gradients,
optimizer state and activations (saved, transient, a recomputed block, collective buffers)
are compared with; parameters are resident before the first step (with the whole model the
program builds, docs/design.md) and are shown apart.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_avg, median, print_table, steady, torchrun


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--cluster", default="profiles/clusters/cpu-homogeneous.toml")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from hap.api import plan_spec
    from hap.cost import CostSetup
    from hap.emit import emit_program
    from hap.solve import memory_report

    plan = plan_spec(args.spec, args.cluster, optimizer=args.optimizer, precision=args.precision)
    cm = CostSetup.of_plan(plan).cost_model(plan.graph, plan.cluster)
    report = memory_report(plan.graph, cm, plan.choice())
    with tempfile.TemporaryDirectory() as tmp:
        emit_program(plan, Path(tmp) / "out", spec=args.spec, force=True)
        log = Path(tmp) / "log.json"
        print(f"plan: shares {list(plan.shares)}, micro-batches {list(plan.micro_batches) or 1}, "
              f"blocks recomputed {len(plan.recompute)}; load average {load_avg()}", flush=True)
        torchrun(plan.num_ranks, Path(tmp) / "out" / "train.py",
                 ["--steps", str(args.steps), "--no-rebalance", "--optimizer", args.optimizer, "--log-json", str(log)])
        record = json.loads(log.read_text())
        step = median(steady(log))
    mb = 2 ** 20
    lines = ["| rank | parameters (pred.) | gradients + optimizer + activations (pred.) | peak - start (meas.) | "
             "error | step pred. | step meas. | error |", "|---|---|---|---|---|---|---|---|"]
    for r, row in enumerate(report):
        # the collective buffer evaluate() adds to the plan's memory is part of what the steps add
        steps_pred = plan.predicted.memory_bytes[r] - row["parameters"]
        got = record["peak_memory_bytes"][r] - record["start_memory_bytes"][r]
        lines.append(f"| {r} | {row['parameters'] / mb:.1f} MiB | {steps_pred / mb:.1f} MiB "
                     f"(grad {row['gradients'] / mb:.1f}, opt {row['optimizer'] / mb:.1f}, act "
                     f"{(steps_pred - row['gradients'] - row['optimizer']) / mb:.1f}) | {got / mb:.1f} MiB | "
                     f"{(steps_pred - got) / got:+.0%} | {plan.predicted_step_s * 1e3:.1f} ms | {step * 1e3:.1f} ms | "
                     f"{(plan.predicted_step_s - step) / step:+.0%} |")
    return print_table(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())

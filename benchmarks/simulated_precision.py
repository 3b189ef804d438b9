"""Benchmark (d): mixed precision on GPU clusters, simulated on the cost model.

    python benchmarks/simulated_precision.py [--examples vgg19 hf_gpt2 hf_bert] \
        [--cases hap-paper:fp16 a100-l4:bf16] [--out FILE]

For each model (paper sizes, ``HAP_SIZE=paper``) and cluster:precision case, plans hap in
that precision and in fp32, and prints one markdown row: hap's predicted step, the data
parallel baselines under the same autocast (DDP-AMP with even and with speed-proportional
shares; they are the MILP with parameters pinned replicated, on the same cost model), hap's
speed-up over each, and over fp32 DDP (what hap's fp32 plan was compared with before). No
number here is a measurement on GPUs: the device profiles' rates are the vendors' peak
figures scaled to what such cards achieve (their provenance is in profiles/devices/).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import print_table  # noqa: E402


def ms(x: float | None) -> str:
    return "does not fit" if x is None else f"{x * 1e3:.1f}"


def ratio(a: float | None, b: float) -> str:
    return "—" if a is None else f"{a / b:.2f}×"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", nargs="*", default=["vgg19", "hf_gpt2", "hf_bert"])
    ap.add_argument("--cases", nargs="*", default=["hap-paper:fp16", "a100-l4:bf16"])
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    os.environ.setdefault("HAP_SIZE", "paper")
    logging.basicConfig(level=logging.ERROR)
    from hap.api import plan_graph
    from hap.cluster import load_cluster
    from hap.spec import capture_spec, load_spec

    head = ("| model | cluster | precision | hap ms | DDP-AMP even ms | DDP-AMP prop. ms | vs even | vs prop. | "
            "hap fp32 ms | DDP fp32 even ms | vs DDP fp32 even | planning s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for ex in args.examples:
        graph = capture_spec(load_spec(ROOT / "examples" / f"{ex}.py"))
        for case in args.cases:
            cl_name, precision = case.split(":")
            cl = load_cluster(cl_name)
            t0 = time.perf_counter()
            low = plan_graph(graph, cl, precision=precision, time_limit_s=args.time_limit)
            fp32 = plan_graph(graph, cl, time_limit_s=args.time_limit)
            took = time.perf_counter() - t0
            hap = low.predicted_step_s
            even, prop = (low.baselines[k].predicted_step_s for k in ("dp_even", "dp_proportional"))
            even32 = fp32.baselines["dp_even"].predicted_step_s
            lines.append(f"| {ex} | {cl_name} | {precision} | {ms(hap)} | {ms(even)} | {ms(prop)} | "
                         f"{ratio(even, hap)} | {ratio(prop, hap)} | {ms(fp32.predicted_step_s)} | {ms(even32)} | "
                         f"{ratio(even32, hap)} | {took:.0f} |")
            print(lines[-1], flush=True)
    return print_table(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())

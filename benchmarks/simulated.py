"""Benchmark (c): every example on every shipped cluster, simulated on the cost model.

    python benchmarks/simulated.py [--examples mlp gpt cnn] [--clusters default hap-paper ...] [--out FILE]

Prints (and with --out writes) a markdown table: predicted step time of hap's plan, of the
baselines dp_even, dp_proportional, fsdp_even, megatron_tp_even, the lower bound, hap's
ratio to the bound and its speed-up over dp_even, and the solve times. Every number comes
from one cost model (hap.cost with the profiles in profiles/devices); the aligned timeline
of every plan is checked against its predicted step (hap.simulate).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import print_table  # noqa: E402

from hap.api import plan_graph
from hap.baselines import BASELINES, baseline
from hap.capture import capture
from hap.cluster import load_cluster
from hap.errors import HapError
from hap.simulate import simulate
from hap.spec import build, load_spec


def ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1e3:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", nargs="*", default=sorted(p.stem for p in (ROOT / "examples").glob("*.py")))
    ap.add_argument("--clusters", nargs="*",
                    default=sorted(p.stem for p in (ROOT / "profiles" / "clusters").glob("*.toml")))
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    head = ("| model | cluster | ranks | hap ms | dp_even | dp_prop | fsdp_even | megatron_tp_even | bound | "
            "hap/bound | vs dp_even | worst baseline ok | hap solve s | baselines solve s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for ex in args.examples:
        mod = load_spec(ROOT / "examples" / f"{ex}.py")
        model, batch = build(mod)
        graph = capture(model, batch, name=ex)
        for cl_name in args.clusters:
            cl = load_cluster(cl_name)
            t0 = time.perf_counter()
            try:
                plan = plan_graph(graph, cl, time_limit_s=args.time_limit)
            except HapError as e:
                lines.append(f"| {ex} | {cl_name} | {cl.num_ranks} | infeasible: {e} |" + " |" * 10)
                continue
            hap_solve = time.perf_counter() - t0
            assert abs(simulate(plan).step_s - plan.predicted_step_s) <= 1e-9 * plan.predicted_step_s
            t1 = time.perf_counter()
            base = {}
            for b in BASELINES:
                try:
                    p = baseline(b, graph, cl, time_limit_s=args.time_limit)
                    base[b] = p.predicted_step_s if p is not None else None
                except HapError:
                    base[b] = None
            base_solve = time.perf_counter() - t1
            hap_s, lb = plan.predicted_step_s, plan.lower_bound_step_s
            ok = all(v is None or hap_s <= v * (1 + 1e-6) for v in base.values())
            lines.append(f"| {ex} | {cl_name} | {cl.num_ranks} | {ms(hap_s)} | {ms(base['dp_even'])} | "
                         f"{ms(base['dp_proportional'])} | {ms(base['fsdp_even'])} | {ms(base['megatron_tp_even'])} | "
                         f"{ms(lb)} | {hap_s / lb:.2f} | {base['dp_even'] / hap_s:.2f}x | {'yes' if ok else 'NO'} | "
                         f"{hap_solve:.1f} | {base_solve:.1f} |")
            print(lines[-1], flush=True)
    return print_table(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())

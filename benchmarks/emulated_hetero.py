"""Benchmark (a): the emitted program vs even data parallel on an emulated heterogeneous CPU cluster.

    HAP_MLP_WIDTH=1024 HAP_MLP_BATCH=256 python benchmarks/emulated_hetero.py examples/mlp.py \
        [--cluster profiles/clusters/default.toml] [--steps 12] [--rounds 3] [--precision bf16]

Plans the spec for the cluster (default: 2 CPU ranks, slowdowns 1 and 3), emits train.py,
then alternates `rounds` times: the emitted program under torchrun with --emulate, and the
even data-parallel baseline (each rank waits (slowdown - 1) x its compute), both in the same
precision (``--precision bf16``: hap's bf16 plan against even DDP under bf16 autocast). Prints
per-round median step times (first 2 steps skipped), the overall medians, the speed-up, the
plan's predicted step (aligned, = the solver's objective) and the finer segment timeline's,
and |predicted - measured| / measured. The machine's load average is printed too: other
processes on the machine inflate both measured times (and so the prediction error).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DDP_EMULATED, load_avg, median, plan_and_emit, steady, torchrun


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--cluster", default="profiles/clusters/default.toml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    from hap.simulate import simulate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan = plan_and_emit(args.spec, args.cluster, tmp / "out", args.precision)
        n, gb = plan.num_ranks, plan.global_batch
        slow = [r.slowdown for r in plan.cluster.ranks]
        even = [gb // n + (1 if i < gb % n else 0) for i in range(n)]
        (tmp / "ddp.py").write_text(DDP_EMULATED)
        hap_all, ddp_all, rounds = [], [], []
        print(f"plan: shares {list(plan.shares)}, strategy {plan.strategy}, predicted "
              f"{plan.predicted_step_s * 1e3:.1f} ms; load average {load_avg()}", flush=True)
        for i in range(args.rounds):
            torchrun(n, tmp / "out" / "train.py", ["--steps", str(args.steps), "--lr", "1e-3", "--seed", "0",
                                                   "--emulate", "--log-json", str(tmp / "hap.json")])
            torchrun(n, tmp / "ddp.py", [str(Path(args.spec).resolve()), str(gb), str(args.steps), json.dumps(even),
                                         json.dumps(slow), str(tmp / "ddp.json"), args.precision])
            h, d = steady(tmp / "hap.json"), steady(tmp / "ddp.json")
            hap_all += h
            ddp_all += d
            rounds.append({"hap_s": median(h), "even_ddp_s": median(d), "load": load_avg()})
            print(f"round {i}: hap {median(h) * 1e3:.1f} ms, even DDP {median(d) * 1e3:.1f} ms, "
                  f"load {load_avg()}", flush=True)
    hap_s, ddp_s = median(hap_all), median(ddp_all)
    pred, seg = plan.predicted_step_s, simulate(plan, "segments").step_s
    res = {"spec": args.spec, "cluster": args.cluster, "precision": args.precision, "shares": list(plan.shares),
           "slowdowns": slow,
           "hap_step_s": hap_s, "even_ddp_step_s": ddp_s, "speedup": ddp_s / hap_s, "predicted_s": pred,
           "predicted_segments_s": seg, "pred_err": abs(pred - hap_s) / hap_s, "rounds": rounds}
    print(f"hap {hap_s * 1e3:.1f} ms, even DDP {ddp_s * 1e3:.1f} ms, speed-up {ddp_s / hap_s:.3f}; predicted "
          f"{pred * 1e3:.1f} ms (segments {seg * 1e3:.1f} ms), error {res['pred_err']:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

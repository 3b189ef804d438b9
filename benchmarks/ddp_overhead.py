"""Benchmark (b): hap's runtime overhead: the emitted program vs torch DistributedDataParallel.

    python benchmarks/ddp_overhead.py examples/mlp.py [--cluster profiles/clusters/cpu-homogeneous.toml]
        [--steps 20] [--rounds 3] [--pin-dp]

On a homogeneous 2-rank CPU cluster, alternates `rounds` times the emitted train.py (no
emulation) and the same model under torch.nn.parallel.DistributedDataParallel with even
shares and the same SGD step, and reports the median step times and their ratio (target
<= 1.05). With --pin-dp the plan is forced to data parallelism (every parameter replicated),
so both programs run the same strategy and the ratio is the runtime's own overhead.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TORCH_DDP, load_avg, median, steady, torchrun


def _plan(spec: str, cluster: str, out: Path, pin_dp: bool):
    from hap.baselines import dp_even
    from hap.cluster import load_cluster
    from hap.emit import emit_program
    from hap.spec import capture_spec, load_spec

    if not pin_dp:
        from _common import plan_and_emit

        return plan_and_emit(spec, cluster, out)
    graph = capture_spec(load_spec(spec))
    plan = dp_even(graph, load_cluster(cluster), spec=str(Path(spec).resolve()))
    emit_program(plan, out, spec=spec, force=True)
    return plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--cluster", default="profiles/clusters/cpu-homogeneous.toml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pin-dp", action="store_true", help="plan = data parallel (dp_even baseline)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan = _plan(args.spec, args.cluster, tmp / "out", args.pin_dp)
        n, gb = plan.num_ranks, plan.global_batch
        (tmp / "ddp.py").write_text(TORCH_DDP)
        hap_all, ddp_all = [], []
        print(f"plan: shares {list(plan.shares)}, strategy {plan.strategy}, predicted "
              f"{plan.predicted_step_s * 1e3:.2f} ms; load average {load_avg()}", flush=True)
        for i in range(args.rounds):
            torchrun(n, tmp / "out" / "train.py", ["--steps", str(args.steps), "--lr", "1e-3",
                                                   "--log-json", str(tmp / "hap.json")])
            torchrun(n, tmp / "ddp.py", [str(Path(args.spec).resolve()), str(gb), str(args.steps),
                                         str(tmp / "ddp.json")])
            h, d = steady(tmp / "hap.json"), steady(tmp / "ddp.json")
            hap_all += h
            ddp_all += d
            print(f"round {i}: hap {median(h) * 1e3:.2f} ms, DDP {median(d) * 1e3:.2f} ms, load {load_avg()}",
                  flush=True)
    hap_s, ddp_s = median(hap_all), median(ddp_all)
    print(f"hap {hap_s * 1e3:.2f} ms, torch DDP {ddp_s * 1e3:.2f} ms, hap / DDP = {hap_s / ddp_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

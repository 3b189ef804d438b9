"""Benchmark: each rank's host memory against its shards' state, for a model that is big next to them.

    python benchmarks/host_memory.py [--width 4096 --depth 23] [--optimizer sgd]

Plans examples/mlp.py at ``--width`` x ``--depth`` (4096 x 23: 369M parameters, 1.5 GB in fp32)
on 2 CPU ranks (profiles/clusters/cpu-homogeneous.toml) with every hidden weight pinned sharded on
dim 0, runs 2 steps of the emitted train.py under torchrun (no --dump-params unless asked), and
prints per rank:
its shards' state (parameters, gradients and optimizer state, from the layout), the peak resident
set the program logs (``peak_memory_bytes``: VmHWM), and the peak less a tiny model's peak (the
fixed runtime overhead: torch, gloo, the data loader, measured the same way at width 64).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "profiles" / "clusters" / "cpu-homogeneous.toml"


def run(width: int, depth: int, optimizer: str, work: Path, dump: bool = False) -> list[int]:
    """Each rank's peak resident bytes in one 2-step run."""
    env = {**os.environ, "HAP_MLP_WIDTH": str(width), "HAP_MLP_DEPTH": str(depth), "HAP_MLP_BATCH": "8",
           "OMP_NUM_THREADS": "1"}
    pins = [f"--pin=p_hidden_{i}_weight=S(0)" for i in range(depth)]
    out = work / f"w{width}"
    subprocess.run(["hap-plan", str(ROOT / "examples" / "mlp.py"), "--cluster", str(CLUSTER), "--optimizer", optimizer,
                    "--emit", str(out), "--force", *pins], env=env, check=True, capture_output=True)
    log = out / "log.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(out / "train.py"), "--steps", "2", "--optimizer", optimizer, "--log-json", str(log),
                    *(["--dump-params", str(out / "params.pt")] if dump else [])],
                   env=env, check=True, capture_output=True)
    return json.loads(log.read_text())["peak_memory_bytes"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=23)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    ap.add_argument("--dump-params", action="store_true", help="the runs also write --dump-params (rank 0 gathers "
                                                              "the whole state, one parameter at a time)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = run(64, 2, args.optimizer, Path(tmp), args.dump_params)
        big = run(args.width, args.depth, args.optimizer, Path(tmp), args.dump_params)
    w = args.width
    sharded = 64 * w + (args.depth - 1) * w * w  # the hidden weights, in halves
    whole = args.depth * w + w * 16 + 16  # biases and the output layer, on every rank
    states = 2 + {"sgd": 0, "adam": 2, "adamw": 2}[args.optimizer]  # parameter, gradient, optimizer state
    shard = (sharded / 2 + whole) * 4 * states
    print(f"model: {(sharded + whole) * 4 / 2**30:.2f} GiB; per rank its shards' state ({states} tensors of "
          f"each): {shard / 2**30:.2f} GiB")
    print("| rank | shards' state | peak RSS | tiny model's peak | peak - tiny | (peak - tiny) / state |")
    print("|---|---|---|---|---|---|")
    for r, (p, t) in enumerate(zip(big, tiny)):
        print(f"| {r} | {shard / 2**30:.2f} GiB | {p / 2**30:.2f} GiB | {t / 2**30:.2f} GiB | "
              f"{(p - t) / 2**30:.2f} GiB | {(p - t) / shard:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

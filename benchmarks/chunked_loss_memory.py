"""The memory a language model's loss takes, computed whole and in chunks (docs/design.md,
"Chunked cross-entropy").

    python benchmarks/chunked_loss_memory.py [--rows 10240] [--classes 8192]

A head (``linear`` of width 256 under bf16 autocast) makes ``rows x classes`` logits; the loss is
``cross_entropy(logits.float().view(-1, C))`` as HF writes it, or ``hr.chunked_cross_entropy``.
Each runs forward and backward in a fresh process, which prints its resident set's peak less
its resident set before the head (VmHWM after resetting it): the head's and loss's temporaries.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r'''
import sys, torch, torch.nn.functional as F
import hap.runtime as hr
mode, rows, classes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
h, w = torch.randn(rows, 256, requires_grad=True), torch.randn(classes, 256, requires_grad=True)
t = torch.randint(0, classes, (rows,))
def status(key):
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(key))
start = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here
with torch.autocast("cpu", dtype=torch.bfloat16):
    logits = F.linear(h, w)
    loss = F.cross_entropy(logits.float().view(-1, classes), t, reduction="sum") if mode == "whole" \
        else hr.chunked_cross_entropy(logits, t, -100, torch.float32)
loss.backward()
print((status("VmHWM") - start) / 2 ** 20)
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10240)
    ap.add_argument("--classes", type=int, default=8192)
    args = ap.parse_args()
    print(f"{args.rows} x {args.classes} bf16 logits ({args.rows * args.classes / 1e6:.0f}M)")
    print("| loss | peak - start |\n|---|---|")
    for mode in ("whole", "chunked"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.rows), str(args.classes)],
                             capture_output=True, text=True, check=True).stdout
        print(f"| {mode} | {float(out.strip().splitlines()[-1]):.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

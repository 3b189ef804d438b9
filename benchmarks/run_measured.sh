#!/usr/bin/env bash
# The measured benchmarks (a) and (b) of docs/benchmarks.md, in the order they were run there.
# Run from the repository root with the project installed; each line prints its own result. Start from an empty ~/.cache/hap to include the first-use calibration.
set -u
echo "== load $(cat /proc/loadavg) $(date -u)"
echo "== (a) bench mlp 1024/1024 x3 (compute-bound)"
for i in 1 2 3; do HAP_MLP_WIDTH=1024 HAP_MLP_BATCH=1024 python benchmarks/emulated_hetero.py examples/mlp.py --rounds 1 | tail -6; done
echo "== (a) bench mlp 2048x2/512 and 768x6/1024 (other compute-bound shapes)"
HAP_MLP_WIDTH=2048 HAP_MLP_DEPTH=2 HAP_MLP_BATCH=512 python benchmarks/emulated_hetero.py examples/mlp.py --rounds 1 | tail -6
HAP_MLP_WIDTH=768 HAP_MLP_DEPTH=6 HAP_MLP_BATCH=1024 python benchmarks/emulated_hetero.py examples/mlp.py --rounds 1 | tail -6
echo "== (a) bench mlp 1024/256 x2 (8.8 MB of gradients against ~45 ms of compute)"
for i in 1 2; do HAP_MLP_WIDTH=1024 HAP_MLP_BATCH=256 python benchmarks/emulated_hetero.py examples/mlp.py --rounds 1 | tail -6; done
echo "== (a) bench gpt, cnn"
python benchmarks/emulated_hetero.py examples/gpt.py --rounds 1 | tail -6
python benchmarks/emulated_hetero.py examples/cnn.py --rounds 1 | tail -6
echo "== (a) emulated_hetero 1024/256, 3 rounds"
HAP_MLP_WIDTH=1024 HAP_MLP_BATCH=256 python benchmarks/emulated_hetero.py examples/mlp.py --rounds 3 | tail -6
echo "== (b) DDP overhead, data parallel pinned"
HAP_MLP_WIDTH=1024 HAP_MLP_BATCH=256 python benchmarks/ddp_overhead.py examples/mlp.py --pin-dp --rounds 3 | tail -6
echo "== (b) DDP overhead, hap's plan"
HAP_MLP_WIDTH=1024 HAP_MLP_BATCH=256 python benchmarks/ddp_overhead.py examples/mlp.py --rounds 3 | tail -6
echo "== load $(cat /proc/loadavg) $(date -u)"

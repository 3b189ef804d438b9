"""``hap-profile``: measure this machine's device (and its links) as a device profile.

    hap-profile [--out FILE] [--quick] [--repeats N] [--nproc N]
    torchrun --nproc-per-node N -m hap.profile [--out FILE]     # (or: torchrun ... $(which hap-profile))

Measures what a `torchrun` rank of an emitted ``train.py`` achieves on this machine:

- CUDA when present (one process per GPU, timed with ``torch.cuda.Event`` after a
  ``synchronize``), else the CPU as torchrun runs it: one single-threaded process per rank
  (OMP_NUM_THREADS=1), ``--nproc`` of them (default 2) measuring *at the same time* so they
  share memory bandwidth and caches as in a real run; rates are per process, the slowest;
- achieved rates in training: matmul (a linear layer's forward and its two backward
  products), convolution and attention (forward + backward through autograd) in fp32, bf16
  and fp16 where the device supports them, several sizes each — reported as
  3 x forward FLOPs / (forward + backward) seconds, the cost model's "backward = 2 x forward";
- memory bandwidth of pointwise ops, reductions and copies; the per-kernel floor (a tiny op
  and its backward node through autograd, per kernel);
- with 2 or more processes: α-β of every collective the plans use, through ``hap.runtime``
  (all-reduce, all-gather, reduce-scatter, all-to-all; even, and uneven 3:1 splits in the
  padded and grouped forms), each fitted by least squares, and the link (α, bytes/s) fitted
  jointly to all of them in the cost model's own formulas (``hap.machine.collective_s``).

Every number is the median of ``--repeats`` samples; the JSON keeps the samples, the median
and the spread ((max - min) / median) of every measurement, and the environment: torch,
CUDA driver / GPU or CPU model, host, date. See docs/profiling.md.

The package by job: ``harness`` (settings, the clock, measurements), ``suites`` (what is
measured, and ``measure``), ``fit`` (α-β fits of the collectives), ``document`` (the
profile JSON and its environment), ``launch`` (processes and the command line).
"""
from hap.profile.launch import main, run

__all__ = ["main", "run"]

"""Shared pieces of the measured benchmarks: plan + emit, torchrun, the reference DDP programs."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Even data parallel with emulated slow ranks, emulated as --emulate does it: each rank
# waits (slowdown - 1) x its forward + backward time, then one
# flat all-reduce of all gradients, then SGD. Forward runs under autocast with the
# precision of the last argument (fp32: none), as DDP + AMP users run it.
DDP_EMULATED = r'''
import json, os, sys, time, importlib.util, torch, torch.distributed as dist
spec_path, gb, steps, shares, slow, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    json.loads(sys.argv[4]), json.loads(sys.argv[5]), sys.argv[6]
low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(sys.argv[7] if len(sys.argv) > 7 else "fp32")
s = importlib.util.spec_from_file_location("spec", spec_path); spec = importlib.util.module_from_spec(s)
sys.path.insert(0, os.path.dirname(os.path.abspath(spec_path))); s.loader.exec_module(spec)
dist.init_process_group("gloo"); r = dist.get_rank()
torch.manual_seed(0); model = spec.model(); opt = torch.optim.SGD(model.parameters(), lr=1e-3)
lo = sum(shares[:r]); times = []
for step in range(steps):
    dist.barrier(); t0 = time.perf_counter()
    full = spec.batch(step, gb)
    mine = tuple(x[lo:lo + shares[r]] for x in full)
    c0 = time.perf_counter()
    with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
        loss = model(*mine) * (shares[r] / gb)
    loss.backward()
    c = time.perf_counter() - c0
    time.sleep(max(0.0, (slow[r] - 1.0) * c))
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    dist.all_reduce(flat)
    opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t0)
if r == 0:
    json.dump({"step_s": times}, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
'''

# torch's DistributedDataParallel on even shares, timed like an emitted train.py step.
TORCH_DDP = r'''
import json, os, sys, time, importlib.util, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
spec_path, gb, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = importlib.util.spec_from_file_location("spec", spec_path); spec = importlib.util.module_from_spec(s)
sys.path.insert(0, os.path.dirname(os.path.abspath(spec_path))); s.loader.exec_module(spec)
dist.init_process_group("gloo"); r, n = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0); model = DDP(spec.model()); opt = torch.optim.SGD(model.parameters(), lr=1e-3)
shares = [gb // n + (1 if i < gb % n else 0) for i in range(n)]; lo = sum(shares[:r]); times = []
for step in range(steps):
    t0 = time.perf_counter()
    full = spec.batch(step, gb)
    mine = tuple(x[lo:lo + shares[r]] for x in full)
    loss = model(*mine)
    opt.zero_grad(set_to_none=False)
    loss.backward()
    opt.step()
    gl = torch.tensor([float(loss.detach()) * shares[r] / gb]); dist.all_reduce(gl)
    times.append(time.perf_counter() - t0)
if r == 0:
    json.dump({"step_s": times}, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
'''


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def plan_and_emit(spec: str, cluster: str, out: Path, precision: str = "fp32"):
    """Plan ``spec`` for ``cluster`` in ``precision`` with hap's API and emit train.py into ``out``."""
    from hap.api import plan_spec
    from hap.emit import emit_program

    plan = plan_spec(spec, cluster, precision=precision)
    emit_program(plan, out, spec=spec, force=True)
    return plan


def torchrun(n: int, script: Path, args: list[str], timeout: int = 900) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(script),
           *args]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return p.stdout


def steady(path: Path, skip: int = 2) -> list[float]:
    return [float(x) for x in json.loads(path.read_text())["step_s"]][skip:]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def print_table(lines: list[str], out: str | None) -> int:
    """Print a markdown table (and write it to ``out``); the benchmark's exit code."""
    text = "\n".join(lines)
    if out:
        Path(out).write_text(text + "\n")
    print()
    print(text)
    return 0

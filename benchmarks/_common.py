"""Shared pieces of the measured benchmark scripts: plan + emit, torchrun, step times, tables."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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

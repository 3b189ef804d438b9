"""End-to-end harness: plan a spec, emit train.py, run it under real torchrun (gloo), and
compare its losses and final parameters with single-device training of the same spec."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from hap.api import plan_spec
from hap.bench.reference import errors, reference
from hap.emit import emit_program

ROOT = Path(__file__).resolve().parents[2]
GLOO_TEARDOWN = "terminate called without an active exception"


def torchrun(nproc: int, script: Path, args: list[str], timeout: int = 300,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun; on a time-out the whole process group is killed, so no
    worker outlives the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
           str(script), *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(f"torchrun timed out after {timeout}s:\n{out[-2000:]}\n{err[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def rank_outputs(source: str, tmp: Path, nproc: int = 2) -> list:
    """Run the script ``source`` on ``nproc`` ranks under torchrun; it writes its JSON result to
    ``sys.argv[1] + f".{rank}"``. Returns each rank's result."""
    script = tmp / "ranks.py"
    script.write_text(source)
    p = torchrun(nproc, script, [str(tmp / "out.json")])
    assert p.returncode == 0, p.stderr[-2000:]
    return [json.loads((tmp / f"out.json.{r}").read_text()) for r in range(nproc)]


def plan_for(spec_path: str, cluster: str, pins: dict[str, str] | None = None, precision: str = "fp32",
             grad_reduce: str = "fp32", recompute: str = "auto", experts: str = "auto", stages: int | str = "auto"):
    return plan_spec(spec_path, cluster, pins=pins, precision=precision, grad_reduce=grad_reduce, recompute=recompute,
                     experts=experts, stages=stages)


def run_exact(spec_path: str, cluster: str, tmp: Path, steps: int = 3, lr: float = 0.05,
              pins: dict[str, str] | None = None, precision: str = "fp32", grad_reduce: str = "fp32",
              train: dict | None = None, train_args: list[str] = (), recompute: str = "auto",
              experts: str = "auto", edit=None, stages: int | str = "auto"):
    """Returns (plan, max relative loss error, max relative parameter error); the run's
    --log-json is at tmp/log.json. ``edit`` (a function of the plan) changes the plan before it
    is emitted."""
    plan = plan_for(spec_path, cluster, pins, precision, grad_reduce, recompute, experts, stages)
    plan = edit(plan) if edit else plan
    emit_program(plan, tmp / "out", spec=spec_path)
    log, dump = tmp / "log.json", tmp / "params.pt"
    p = torchrun(plan.num_ranks, tmp / "out" / "train.py",
                 ["--steps", str(steps), "--lr", str(lr), "--log-json", str(log), "--dump-params", str(dump),
                  *train_args])
    assert p.returncode == 0, f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert GLOO_TEARDOWN not in p.stderr
    got_losses = json.loads(log.read_text())["losses"]
    got = torch.load(dump, weights_only=True)
    want_losses, want = reference(spec_path, steps, lr, plan.global_batch, precision, train)
    assert len(got_losses) == steps
    assert set(got) == set(want), f"state_dict keys differ: {set(got) ^ set(want)}"
    loss_err, param_err, problem = errors(got_losses, got, want_losses, want)
    assert problem is None, problem
    return plan, loss_err, param_err

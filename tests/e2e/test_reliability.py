"""Checkpoints that survive a crash and move between plans; clear stops on bad runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hap.emit import emit_program
from tests.e2e.harness import ROOT, plan_for, torchrun

CLUSTERS = ROOT / "profiles" / "clusters"
GPT = str(ROOT / "examples" / "gpt.py")


def emit(tmp, name: str, cluster: str, spec: str = GPT):
    plan = plan_for(spec, str(CLUSTERS / f"{cluster}.toml"))
    emit_program(plan, tmp / name, spec=spec)
    return plan, tmp / name / "train.py"


def ok(p):
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def params_equal(a, b) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k].float() - b[k].float()).abs().max()}"


def test_killed_rank_restarts_from_checkpoint_and_ends_identical(tmp_path):
    """A worker is killed (SIGKILL, as the OOM killer or a lost machine would) once step 3 is logged;
    torchrun restarts the job, which resumes from its latest checkpoint and ends where an
    uninterrupted run ends. Re-balancing is off: when to move samples depends on measured times,
    and the two runs would add their gradients in other orders (equal to fp32 rounding only)."""
    _, script = emit(tmp_path, "two", "default")
    common = ["--steps", "40", "--optimizer", "adam", "--lr", "0.01", "--no-rebalance"]
    ok(torchrun(2, script, common + ["--dump-params", str(tmp_path / "straight.pt")]))
    p = ok(run_and_kill_a_worker(script, common + ["--save", str(tmp_path / "ck"), "--save-every", "2",
                                                   "--dump-params", str(tmp_path / "resumed.pt")],
                                 when="step    3"))
    out = p.stdout + p.stderr
    assert "resuming from" in out and "step_00000" in out
    params_equal(torch.load(tmp_path / "straight.pt", weights_only=True),
                 torch.load(tmp_path / "resumed.pt", weights_only=True))


def run_and_kill_a_worker(script, args, when: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """torchrun --max-restarts=1 with 2 workers; SIGKILL one worker when rank 0 prints ``when``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           str(script), *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True) as p:
        deadline, lines, killed = time.monotonic() + timeout, [], None
        try:
            for line in p.stdout:
                lines.append(line)
                if killed is None and when in line:
                    killed = _workers_of(p.pid)[-1]
                    os.kill(killed, signal.SIGKILL)
                if time.monotonic() > deadline:
                    raise AssertionError("torchrun did not finish in time:\n" + "".join(lines[-40:]))
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert killed is not None, "the run ended before the worker could be killed:\n" + "".join(lines[-40:])
    return subprocess.CompletedProcess(cmd, p.returncode, "".join(lines), "")


def _workers_of(agent_pid: int) -> list[int]:
    """The worker processes torchrun's agent started, oldest first."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    return sorted(int(c) for c in children)


def test_two_rank_checkpoint_resumes_under_a_three_rank_plan(tmp_path):
    _, two = emit(tmp_path, "two", "default")
    _, three = emit(tmp_path, "three", "cpu-1-2-4")
    common = ["--optimizer", "sgd", "--lr", "0.05"]
    ok(torchrun(2, two, common + ["--steps", "5", "--dump-params", str(tmp_path / "straight.pt")]))
    ok(torchrun(2, two, common + ["--steps", "3", "--save", str(tmp_path / "ck")]))
    ok(torchrun(3, three, common + ["--steps", "5", "--resume", str(tmp_path / "ck"),
                                    "--dump-params", str(tmp_path / "moved.pt")]))
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "moved.pt", weights_only=True)
    assert set(a) == set(b)
    for k in a:  # a different plan sums in another order: equal to fp32 rounding
        err = float((a[k].float() - b[k].float()).abs().max() / (a[k].float().abs().max() + 1e-6))
        assert err < 1e-4, (k, err)


def test_resume_from_another_models_checkpoint_is_refused(tmp_path):
    _, gpt = emit(tmp_path, "gpt", "default")
    _, mlp = emit(tmp_path, "mlp", "default", spec=str(ROOT / "examples" / "mlp.py"))
    ok(torchrun(2, mlp, ["--steps", "1", "--save", str(tmp_path / "ck")]))
    p = torchrun(2, gpt, ["--steps", "2", "--resume", str(tmp_path / "ck")])
    assert p.returncode != 0
    assert "another model" in p.stdout + p.stderr
    assert 'train.py", line' not in p.stdout + p.stderr


@pytest.mark.parametrize("lr", ["1e30"])
def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path, lr):
    _, script = emit(tmp_path, "mlp", "default", spec=str(ROOT / "examples" / "mlp.py"))
    p = torchrun(2, script, ["--steps", "6", "--lr", lr, "--save", str(tmp_path / "ck"), "--save-every", "1"])
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "at step" in out and "Last good checkpoint" in out and "step_00000" in out


def test_a_run_with_dropout_resumes_drawing_what_it_would_have_drawn(tmp_path):
    # each rank's dropout masks come from a stream of (seed, step, micro-batch, rank), not from
    # what ran before: stopping after step 2 and resuming ends with the same parameters, bit for
    # bit, as one run of 4 steps (tests/test_rng.py checks that the ranks' streams differ)
    spec = str(ROOT / "tests/models/dropout_mlp.py")
    plan, train = emit(tmp_path, "out", "default", spec)
    common = ["--lr", "0.05", "--no-rebalance"]
    ok(torchrun(2, train, common + ["--steps", "4", "--dump-params", str(tmp_path / "straight.pt")]))
    ok(torchrun(2, train, common + ["--steps", "2", "--save", str(tmp_path / "ck")]))
    ok(torchrun(2, train, common + ["--steps", "4", "--resume", str(tmp_path / "ck"),
                                    "--dump-params", str(tmp_path / "resumed.pt")]))
    params_equal(torch.load(tmp_path / "straight.pt", weights_only=True),
                 torch.load(tmp_path / "resumed.pt", weights_only=True))


def test_a_restarted_attempt_continues_from_its_own_checkpoint_not_the_older_resume(tmp_path):
    """--resume names where the job began; after a crash under --max-restarts the restarted
    attempt continues from this run's newest checkpoint in --save, not from that start again."""
    _, script = emit(tmp_path, "two", "default", spec=str(ROOT / "examples" / "mlp.py"))
    ok(torchrun(2, script, ["--steps", "2", "--save", str(tmp_path / "start")]))
    p = ok(run_and_kill_a_worker(script, ["--steps", "12", "--resume", str(tmp_path / "start"), "--save",
                                          str(tmp_path / "ck"), "--save-every", "2", "--no-rebalance"],
                                 when="step    5"))
    resumed = [line for line in p.stdout.splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 2, p.stdout[-3000:]
    assert "start/step_000002" in resumed[0] and "ck/step_00000" in resumed[1], resumed

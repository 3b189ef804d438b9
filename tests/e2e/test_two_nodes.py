"""Two machines with different process counts, emulated on this one: two torchrun agents
(``--nnodes 2``, one with 1 process and one with 2, rendezvous on 127.0.0.1) run the
3-rank program the way its docstring says. It trains exactly what one device trains, and
agents started with each other's ``--node-rank`` are refused with a message on every rank."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from hap.emit import emit_program
from tests.e2e.harness import GLOO_TEARDOWN, plan_for, reference
from tests.helpers import ROOT, free_port

CLUSTER = str(ROOT / "profiles" / "clusters" / "cpu-2-nodes.toml")
SPEC = str(ROOT / "examples" / "mlp.py")
PIN = {"p_hidden_1_weight": "S(0)"}  # a sharded weight: uneven collectives cross the node boundary


def launch_nodes(script: Path | list[Path], nodes: list[tuple[int, int]], args: list[str], cwd: Path,
                 timeout: int = 240, node_args: list[list[str]] | None = None,
                 wait_all: bool = False) -> list[subprocess.CompletedProcess]:
    """One torchrun agent per (node rank, processes), all joining one static rendezvous; node i
    runs ``script[i]`` (or the one ``script``) with ``args`` and then ``node_args[i]``. With
    ``wait_all`` every agent must end by itself (a program that stops every rank), else a
    failed agent ends the others."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs, logs = [], []
    for i, (node_rank, nproc) in enumerate(nodes):
        own = script[i] if isinstance(script, list) else script
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(nodes)), "--node-rank",
               str(node_rank), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
               str(port), str(own), *args, *(node_args[i] if node_args else [])]
        # output to files, not pipes: nobody reads a pipe while the agents run, and a full one blocks
        logs.append((cwd / f"agent{node_rank}.out", cwd / f"agent{node_rank}.err"))
        with open(logs[-1][0], "w") as out, open(logs[-1][1], "w") as err:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=cwd,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    # an agent that fails leaves the others waiting for it in the rendezvous: stop them all then
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if not wait_all and any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    timed_out = any(p.poll() is None for p in procs) and time.monotonic() >= deadline
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    results = [subprocess.CompletedProcess(p.args, p.wait(), o.read_text(), e.read_text())
               for p, (o, e) in zip(procs, logs)]
    if timed_out:
        raise AssertionError(f"the torchrun agents did not finish within {timeout}s:\n"
                             + "\n".join(f"agent {i}: rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
                                         for i, r in enumerate(results)))
    return results


def test_two_nodes_with_different_process_counts_train_exactly(tmp_path):
    planned = tmp_path / "planning-machine"
    (planned / "specs").mkdir(parents=True)
    spec = shutil.copy(SPEC, planned / "specs" / "mlp.py")
    plan = plan_for(spec, CLUSTER, PIN)
    assert [r.node for r in plan.cluster.ranks] == [0, 1, 1]
    assert len(set(plan.shares)) > 1 and min(plan.shares) > 0, plan.shares  # uneven, every rank computes
    emit_program(plan, planned / "out", spec=spec)
    text = (planned / "out" / "train.py").read_text()
    assert "--node-rank 0 --nproc-per-node 1" in text and "--node-rank 1 --nproc-per-node 2" in text
    # the nodes hold the same layout somewhere else: nothing may point back at the planning machine
    nodes = tmp_path / "cluster-nodes"
    shutil.move(planned, nodes)
    log, dump, steps, lr = tmp_path / "log.json", tmp_path / "params.pt", 3, 0.05
    args = ["--steps", str(steps), "--lr", str(lr), "--log-json", str(log), "--dump-params", str(dump)]
    results = launch_nodes(Path("out") / "train.py", [(0, 1), (1, 2)], args, cwd=nodes)
    report = "\n".join(f"agent {i}: rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
                       for i, r in enumerate(results))
    assert all(r.returncode == 0 and GLOO_TEARDOWN not in r.stderr for r in results), report
    got_losses = json.loads(log.read_text())["losses"]
    got = torch.load(dump, weights_only=True)
    want_losses, want = reference(SPEC, steps, lr, plan.global_batch)
    for a, b in zip(got_losses, want_losses, strict=True):
        assert abs(a - b) <= 1e-5 + 1e-4 * abs(b), (got_losses, want_losses)
    assert set(got) == set(want)
    for k, w in want.items():
        assert float((got[k] - w).abs().max() / (w.abs().max() + 1e-6)) <= 1e-4, k


def test_nodes_started_in_the_wrong_order_are_refused(tmp_path):
    plan = plan_for(SPEC, CLUSTER, PIN)
    train = emit_program(plan, tmp_path / "out", spec=SPEC)
    # node rank 0 is the 2-process agent: torchrun gives it ranks 0 and 1, which the plan put on other nodes
    results = launch_nodes(train, [(0, 2), (1, 1)], ["--steps", "2"], cwd=tmp_path, timeout=120)
    text = "".join(r.stdout + r.stderr for r in results)
    assert all(r.returncode != 0 for r in results), text[-3000:]
    for rank in range(3):
        assert f"rank {rank}: torchrun started it as" in text, text[-3000:]
    assert "--node-rank 1 --nproc-per-node 2" in text

"""The model's initial state (hap.runtime.initial): ranks build on the meta device and read their
slices; the values are single-device initialisation, from a node's own temporary checkpoint or
from one written once with --write-init, and one of another seed is refused."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

from hap.emit import emit_program
from hap.spec import load_spec
from tests.e2e.harness import ROOT, plan_for, torchrun

SPEC = str(ROOT / "examples" / "gpt.py")


def _leftovers() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("hap-init-")}


def test_ranks_start_from_single_device_initialisation_without_building_the_model(tmp_path):
    plan = plan_for(SPEC, str(ROOT / "profiles" / "clusters" / "cpu-1-2-4.toml"),
                    {"p_tok_weight": "S(0)", "p_blocks_0_qkv_weight": "S(0)"})
    emit_program(plan, tmp_path / "out", spec=SPEC)
    train = tmp_path / "out" / "train.py"
    before = _leftovers()
    p = torchrun(plan.num_ranks, train, ["--steps", "0", "--seed", "5", "--dump-params", str(tmp_path / "a.pt")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "does not build on the meta device" not in p.stdout
    assert _leftovers() == before, "the node's initial state is removed once read"
    torch.manual_seed(5)
    want = load_spec(SPEC).model().state_dict()
    got = torch.load(tmp_path / "a.pt", weights_only=True)
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())

    # written once, read by every rank; another seed is refused with what to do
    w = subprocess.run([sys.executable, str(train), "--write-init", str(tmp_path / "init"), "--seed", "5"],
                       capture_output=True, text=True)
    assert w.returncode == 0 and "--init" in w.stdout, w.stderr[-2000:]
    p = torchrun(plan.num_ranks, train, ["--steps", "0", "--seed", "5", "--init", str(tmp_path / "init"),
                                         "--dump-params", str(tmp_path / "b.pt")])
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    p = torchrun(plan.num_ranks, train, ["--steps", "1", "--seed", "6", "--init", str(tmp_path / "init")])
    assert p.returncode != 0 and "written with --seed 5, this run has --seed 6" in p.stderr

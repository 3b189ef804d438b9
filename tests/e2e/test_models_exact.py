"""End to end: the emitted SPMD programs of the model-coverage examples train exactly what
single-device training trains (hapcheck exact: torchrun with gloo, 3 SGD steps, losses
and parameters compared), on the default 2-rank emulated cluster with uneven shares."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAPCHECK = Path(__file__).resolve().parents[3] / "shared" / "checks" / "hapcheck.py"


@pytest.mark.parametrize("example", ["vgg19", "bert_moe", "hf_llama"])
def test_example_trains_exactly(example):
    if not HAPCHECK.exists():
        pytest.skip(f"the acceptance checker {HAPCHECK} is missing (it lives in ../shared beside the repo)")
    if example.startswith("hf_"):
        pytest.importorskip("transformers")
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("HAP_SIZE", None)  # the tiny size
    p = subprocess.run([sys.executable, str(HAPCHECK), "exact", f"examples/{example}.py",
                        "profiles/clusters/default.toml"], check=False, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    assert p.returncode == 0 and last.startswith("ok"), \
        f"hapcheck exact {example}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"

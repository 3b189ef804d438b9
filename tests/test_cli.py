"""hap-plan: the table, exactly one JSON object, and exit 2 with a message (no traceback)
for every user mistake."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

HAP_PLAN = [sys.executable, "-m", "hap.cli"]


def run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*HAP_PLAN, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_json_is_one_object_with_the_contract_fields():
    p = run("examples/mlp.py", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert {"ranks", "global_batch", "predicted_step_s", "baselines", "lower_bound_step_s", "solve_s",
            "solver_status", "nodes"} <= set(d)
    assert [r["rank"] for r in d["ranks"]] == [0, 1]
    assert all({"device", "batch_share", "memory_bytes"} <= set(r) for r in d["ranks"])
    assert sum(r["batch_share"] for r in d["ranks"]) == d["global_batch"]
    assert {"dp_even", "dp_proportional"} <= set(d["baselines"])


def test_table_shows_ranks_strategy_and_baselines():
    p = run("examples/cnn.py", "--cluster", "profiles/clusters/cpu-1-2-4.toml")
    assert p.returncode == 0, p.stderr
    for word in ("batch share", "strategy per layer", "dp_even", "dp_proportional", "lower bound", "conv1"):
        assert word in p.stdout, word


def test_recompute_all_marks_the_recomputed_layers_and_records_them():
    p = run("examples/gpt.py", "--recompute", "all", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["recompute"] == ["blocks.0", "blocks.1"]
    p = run("examples/gpt.py", "--recompute", "all")
    assert "blocks.0.qkv (recomputed)" in p.stdout and "activation checkpointing: 2 of 2 blocks" in p.stdout


def _spec(tmp_path, body: str):
    f = tmp_path / "spec.py"
    f.write_text(body)
    return str(f)


BAD = {
    "missing spec": (lambda t: ["nope.py"], "does not exist"),
    "spec without model": (lambda t: [_spec(t, "BATCH_SIZE = 4\ndef batch(s, b): return ()\n")], "lacks model"),
    "spec that raises": (lambda t: [_spec(t, "raise RuntimeError('boom')\n")], "boom"),
    "missing cluster": (lambda t: ["examples/mlp.py", "--cluster", "nope.toml"], "nope.toml"),
    "malformed cluster": (lambda t: ["examples/mlp.py", "--cluster", _toml(t, "[[nodes]\ndevice = 'cpu'\n")],
                          "line"),
    "unknown device": (lambda t: ["examples/mlp.py", "--cluster",
                                  _toml(t, "[[nodes]]\ndevice = 'V100-16G'\ncount = 2\n")],
                       "V100-16GB"),
    "data-dependent control flow": (lambda t: [_spec(t, DATA_DEPENDENT)], "control flow"),
    "integer loss": (lambda t: [_spec(t, LOSS.format(loss="self.lin(x).argmax()"))], "int64 scalar"),
    "loss without gradient": (lambda t: [_spec(t, LOSS.format(loss="self.lin(x).detach().mean()"))],
                              "no parameter's gradient"),
    "no stages": (lambda t: ["examples/mlp.py", "--stages", "0"], "--stages 0: give auto or a number"),
    "more stages than blocks": (lambda t: ["examples/gpt.py", "--cluster", "profiles/clusters/cpu-1-2-4.toml",
                                           "--stages", "3"], "fewer blocks (2)"),
    "cluster is a directory": (lambda t: ["examples/mlp.py", "--cluster", "profiles/clusters"], "is a directory"),
    "emit into a file": (lambda t: ["examples/mlp.py", "--emit", _toml(t, "user data")], "existing file"),
    # a 60k x 60k weight with Adam: 29 GB per V100 even sharded over both; the levers are named
    "nothing fits": (lambda t: [_spec(t, SPEC.replace("Linear(3, 2)", "Linear(60000, 60000)").replace(
        "randn(bs, 3)", "randn(bs, 60000)").format(forward="return self.lin(x).pow(2).mean()")),
        "--optimizer", "adam", "--cluster", _toml(t, "[[nodes]]\ndevice = 'V100-16GB'\ncount = 2\n")],
        "its parameter state alone"),
}


def _toml(tmp_path, text: str) -> str:
    f = tmp_path / "c.toml"
    f.write_text(text)
    return str(f)


SPEC = """
import torch
BATCH_SIZE = 4
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
    def forward(self, x):
        {forward}
def model(): return M()
def batch(step, bs): return (torch.randn(bs, 3),)
"""
DATA_DEPENDENT = SPEC.format(forward="y = self.lin(x)\n        return y.mean() if y.sum() > 0 else -y.mean()")
LOSS = SPEC.replace("{forward}", "return {loss}")


@pytest.mark.parametrize("case", sorted(BAD))
def test_user_mistakes_exit_2_with_a_message(case, tmp_path):
    make, needle = BAD[case]
    p = run(*make(tmp_path))
    assert p.returncode == 2, (case, p.returncode, p.stderr[-2000:])
    assert needle in p.stderr, (case, p.stderr)
    assert "Traceback" not in p.stderr


def test_a_mistyped_pin_exits_2_as_a_pin_error_not_an_infeasible_plan():
    p = run("examples/mlp.py", "--pin", "foo")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "--pin foo: no '='" in p.stderr and "NODE=PLACEMENT" in p.stderr and "S(d/u)" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("pin, why", [("foo", "no '='"), ("x=Q(3)", "'Q(3)' is not a placement"),
                                      ("x=S(a)", "'S(a)' is not a placement"), ("=S(0)", "no node name")])
def test_pin_syntax_is_checked_before_the_model_is_captured(pin, why, monkeypatch):
    import hap.spec
    from hap.cli import _main, parse_args
    from hap.errors import InfeasiblePlan, PinError

    monkeypatch.setattr(hap.spec, "load_spec", lambda path: pytest.fail("a mistyped pin loaded the spec"))
    with pytest.raises(PinError, match="NODE=PLACEMENT") as e:
        _main(parse_args(["examples/mlp.py", "--pin", pin]), None, None)
    assert f"--pin {pin}" in str(e.value) and why in str(e.value) and not isinstance(e.value, InfeasiblePlan)


def test_emit_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    p = run("examples/mlp.py", "--emit", str(tmp_path))
    assert p.returncode == 2 and "--force" in p.stderr
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_emit_into_a_file_leaves_it_alone(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("user data")
    p = run("examples/mlp.py", "--emit", str(f), "--force")
    assert p.returncode == 2 and "existing file" in p.stderr and "Traceback" not in p.stderr
    assert f.read_text() == "user data"


FD1_BANNER = "Running FakeHiGHS 9.9 (stand-in): printed from C to descriptor 1"


def _solve_printing_to_fd1(monkeypatch):
    """Make every HiGHS solve print a banner from C, through the C library's buffered stdout
    (not sys.stdout), the way highspy >= 1.16 does."""
    import ctypes

    import pulp

    libc = ctypes.CDLL(None)
    real = pulp.HiGHS.actualSolve

    def printing(self, lp, **kw):
        libc.printf((FD1_BANNER + "\n").encode())
        return real(self, lp, **kw)

    monkeypatch.setattr(pulp.HiGHS, "actualSolve", printing)


def test_json_stays_one_object_when_the_solver_prints_to_fd1(monkeypatch, capfd):
    from hap.cli import main

    _solve_printing_to_fd1(monkeypatch)
    assert main(["examples/mlp.py", "--json", "--time-limit", "5"]) == 0
    out, err = capfd.readouterr()
    assert FD1_BANNER not in out
    assert json.loads(out)["global_batch"] > 0  # the whole of stdout is one JSON object
    assert FD1_BANNER not in err  # shown only with --verbose


def test_table_has_no_banner_and_verbose_shows_it(monkeypatch, capfd):
    from hap.cli import main

    _solve_printing_to_fd1(monkeypatch)
    assert main(["examples/mlp.py", "--verbose", "--time-limit", "5"]) == 0
    out, err = capfd.readouterr()
    assert FD1_BANNER not in out and "batch share" in out
    assert FD1_BANNER in err

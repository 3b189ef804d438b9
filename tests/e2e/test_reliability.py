"""Checkpoints that survive a crash and move between plans; clear stops on bad runs."""
from __future__ import annotations

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
    _, script = emit(tmp_path, "two", "default")
    common = ["--steps", "6", "--optimizer", "adam", "--lr", "0.01"]
    ok(torchrun(2, script, common + ["--dump-params", str(tmp_path / "straight.pt")]))
    p = ok(torchrun_restart(script, common + [
        "--save", str(tmp_path / "ck"), "--save-every", "2", "--fail-at-step", "3", "--fail-rank", "1",
        "--dump-params", str(tmp_path / "resumed.pt")]))
    out = p.stdout + p.stderr
    assert "fails at step 3" in out and "resuming from" in out and "step_000002" in out
    params_equal(torch.load(tmp_path / "straight.pt", weights_only=True),
                 torch.load(tmp_path / "resumed.pt", weights_only=True))


def torchrun_restart(script, args):
    return torchrun(2, script, args, extra=("--max-restarts=1",))


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

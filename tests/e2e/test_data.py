"""Dataset specs under real torchrun: exact against the documented global order across an
epoch boundary, resume under another plan with another number of ranks, and validation that
reports the val split's loss without changing what training computes."""
from __future__ import annotations

import json

import torch

from tests.e2e.harness import ROOT, run_exact, torchrun
from tests.e2e.test_reliability import emit, ok

SPEC = str(ROOT / "tests/models/dataset_mlp.py")  # 200 items, batches of 24: 8 steps an epoch
CLUSTERS = ROOT / "profiles" / "clusters"


def test_dataset_spec_is_exact_across_an_epoch_boundary(tmp_path):
    plan, loss_err, param_err = run_exact(SPEC, str(CLUSTERS / "cpu-1-2-4.toml"), tmp_path, steps=11)
    assert len(set(plan.shares)) == 3
    log = json.loads((tmp_path / "log.json").read_text())
    assert len(log["data_wait_s"]) == 11 and all(w >= 0 for w in log["data_wait_s"])
    assert loss_err < 1e-5 and param_err < 1e-5, (loss_err, param_err)


def test_dataset_checkpoint_resumes_on_three_ranks_as_if_uninterrupted(tmp_path):
    """Saved at step 5 of epoch 0 by a 2-rank plan, continued past the epoch boundary by a
    3-rank plan with other shares: the same global batches, the same parameters."""
    _, two = emit(tmp_path, "two", "default", SPEC)
    _, three = emit(tmp_path, "three", "cpu-1-2-4", SPEC)
    common = ["--lr", "0.1"]
    ok(torchrun(2, two, common + ["--steps", "11", "--dump-params", str(tmp_path / "straight.pt")]))
    ok(torchrun(2, two, common + ["--steps", "5", "--save", str(tmp_path / "ck")]))
    from hap.runtime.checkpoint import read_meta

    assert read_meta(tmp_path / "ck" / "step_000005")["data_position"] == {"step": 5, "epoch": 0, "step_in_epoch": 5}
    ok(torchrun(3, three, common + ["--steps", "11", "--resume", str(tmp_path / "ck"),
                                    "--dump-params", str(tmp_path / "moved.pt")]))
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "moved.pt", weights_only=True)
    for k in a:  # another plan sums in another order: equal to fp32 rounding
        err = float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-6))
        assert err < 1e-5, (k, err)


def test_validation_reports_the_val_loss_and_leaves_training_unchanged(tmp_path):
    _, train = emit(tmp_path, "out", "default", SPEC)
    common = ["--lr", "0.1", "--steps", "7", "--no-rebalance"]  # bitwise: the same shares in both runs
    ok(torchrun(2, train, common + ["--dump-params", str(tmp_path / "plain.pt")]))
    p = ok(torchrun(2, train, common + ["--eval-every", "3", "--eval-batches", "4", "--log-json",
                                        str(tmp_path / "log.json"), "--dump-params", str(tmp_path / "eval.pt")]))
    a = torch.load(tmp_path / "plain.pt", weights_only=True)
    b = torch.load(tmp_path / "eval.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    val = json.loads((tmp_path / "log.json").read_text())["val_losses"]
    assert [v["step"] for v in val] == [3, 6, 7] and "val loss" in p.stdout
    # the last one is the single-device loss of the trained model on the first 4 val batches
    import importlib.util

    loader = importlib.util.spec_from_file_location("dataset_mlp", SPEC)
    spec = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(spec)
    net = spec.model()
    net.load_state_dict(b)
    ds = spec.dataset("val")
    with torch.no_grad():
        want = sum(float(net(*torch.utils.data.default_collate([ds[i] for i in range(24 * j, 24 * j + 24)])))
                   for j in range(4)) / 4
    assert abs(val[-1]["loss"] - want) < 1e-5, (val[-1]["loss"], want)

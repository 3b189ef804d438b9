"""Start-up checks a rank makes on its own (hap.runtime.program.prepare agrees on them across
ranks): each is a message, found before the first step."""
from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch

from hap.runtime import checks
from hap.runtime import program as prog


def test_a_val_split_smaller_than_a_batch_is_found_at_start_up():
    spec = types.SimpleNamespace(dataset=lambda split: list(range(10 if split == "val" else 100)))
    args = argparse.Namespace(eval_every=5)
    with pytest.raises(prog.Refused, match="the val split has 10 items, fewer than one global batch of 16"):
        prog.check_val_split(spec, args, 16)
    prog.check_val_split(spec, args, 8)
    prog.check_val_split(spec, argparse.Namespace(eval_every=0), 16)  # not evaluating: not needed


def test_tensorboard_without_the_package_is_a_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(prog.Refused, match=r"pip install 'hap\[tensorboard\]'"):
        prog.tensorboard_writer("runs", 0)
    assert prog.tensorboard_writer("runs", 1) is None  # only rank 0 writes


def test_a_gpu_plan_on_a_build_without_cuda_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    msg = checks.cuda_missing(["T4-16GB", "T4-16GB"])
    assert "this plan runs on GPUs (T4-16GB, NCCL)" in msg and "CPU-only torch build" in msg
    assert checks.cuda_missing(["cpu", "cpu"]) is None
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no usable CUDA device" in checks.cuda_missing(["A100-80GB"])

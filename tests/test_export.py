"""hap-export: a sharded checkpoint as the single-device state_dict in safetensors, shards
assembled and tied weights included; what state_dict() holds and nothing more; no code run from
the checkpoint unless trusted; --out replaced whole or not at all; a torn checkpoint is a message."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hap.export import main as hap_export
from hap.runtime import checkpoint as ckpt
from tests.helpers import load_example


def _save(directory: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    return ckpt.save(directory, step, tensors, meta, 0, lambda: None, run_id="test")


class _Rotary(torch.nn.Module):
    """A projection with a persistent buffer and, as Llama's rotary embedding, a non-persistent one."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 6)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 4, 2).float() / 4), persistent=False)
        self.register_buffer("steps", torch.tensor([3.0]))


def _save_rotary(directory: Path, unrecorded: tuple[str, ...] = ()) -> tuple[Path, _Rotary]:
    """A checkpoint of a _Rotary, its weight in two uneven shards; the buffers in ``unrecorded``
    carry no "persistent" field, as in a checkpoint written before hap recorded it."""
    torch.manual_seed(0)
    model = _Rotary()
    w, b = model.proj.weight.detach(), model.proj.bias.detach()
    tensors = {"model/proj.weight/0": w[:2].clone(), "model/proj.weight/1": w[2:].clone(),
               "model/proj.bias": b.clone()}
    layout = {"proj.weight": {"shape": [6, 4], "dim": 0, "lengths": [2, 4], "aliases": ["proj.weight"],
                              "dtype": "float32"},
              "proj.bias": {"shape": [6], "dim": None, "lengths": None, "aliases": ["proj.bias"], "dtype": "float32"}}
    buffers = {}
    persistent = set(model.state_dict())
    for name, v in model.named_buffers():
        tensors[f"model/{name}"] = v.clone()
        buffers[name] = {"shape": list(v.shape), "dim": None, "lengths": None, "dtype": "float32"}
        if name not in unrecorded:
            buffers[name]["persistent"] = name in persistent
    return _save(directory, 3, tensors, {"layout": layout, "optimizer": {}, "buffers": buffers}), model


def test_a_sharded_checkpoint_exports_to_safetensors_that_load_into_the_model(tmp_path, capsys):
    gpt = load_example("gpt")
    torch.manual_seed(0)
    model = gpt.model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors, layout = {}, {}
    for key, v in state.items():
        if key == "head.weight":
            continue  # tied to tok.weight: one tensor, two names
        aliases = [key, "head.weight"] if key == "tok.weight" else [key]
        if v.dim() == 2:  # stored as two uneven shards along dim 0, as a 2-rank plan writes them
            lengths = [v.shape[0] // 3, v.shape[0] - v.shape[0] // 3]
            tensors[f"model/{key}/0"], tensors[f"model/{key}/1"] = v[:lengths[0]].clone(), v[lengths[0]:].clone()
            layout[key] = {"shape": list(v.shape), "dim": 0, "lengths": lengths, "aliases": aliases}
        else:
            tensors[f"model/{key}"] = v
            layout[key] = {"shape": list(v.shape), "dim": None, "lengths": None, "aliases": aliases}
    _save(tmp_path / "ck", 7, tensors, {"layout": layout, "optimizer": {}, "buffers": {}})
    assert {"model/tok.weight/0", "model/tok.weight/1", "model/ln_f.bias"} <= ckpt.stored_keys(
        str(tmp_path / "ck" / "step_000007"))
    assert hap_export([str(tmp_path / "ck"), "--out", str(tmp_path / "model.safetensors")]) == 0
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    fresh = gpt.model()
    fresh.load_state_dict(loaded)
    assert fresh.head.weight is fresh.tok.weight and torch.equal(fresh.tok.weight, state["tok.weight"])
    assert "wrote" in capsys.readouterr().out


def test_the_export_holds_what_state_dict_holds_so_a_strict_load_accepts_it(tmp_path):
    # inv_freq is not persistent: not in state_dict(), so not in the export; "steps" comes from a
    # checkpoint that does not say, and is kept
    path, model = _save_rotary(tmp_path / "ck", unrecorded=("steps",))
    assert hap_export([str(path), "--out", str(tmp_path / "m.safetensors")]) == 0
    loaded = load_file(tmp_path / "m.safetensors")
    assert set(loaded) == set(model.state_dict()) == {"proj.weight", "proj.bias", "steps"}
    fresh = _Rotary()
    fresh.load_state_dict(loaded, strict=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def _owned_by_another_user(path: Path, monkeypatch) -> None:
    if os.geteuid() == 0:  # root gives the file away
        os.chown(path, 12345, 12345)
    else:  # anyone else becomes another user
        monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 1)


def test_exporting_unpickles_nothing_of_its_own_and_refuses_another_users_metadata(tmp_path, monkeypatch, capsys):
    real_load = torch.load

    def tensors_only(*args, weights_only=None, **kwargs):  # DCP reads each tensor with weights_only=True
        if weights_only is not True:
            raise AssertionError(f"torch.load({args[:1]}, weights_only={weights_only}) can run code")
        return real_load(*args, weights_only=True, **kwargs)

    monkeypatch.setattr(torch, "load", tensors_only)
    path, model = _save_rotary(tmp_path / "ck")
    assert hap_export([str(path), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert set(load_file(tmp_path / "m.safetensors")) == set(model.state_dict())
    capsys.readouterr()

    _owned_by_another_user(path / ".metadata", monkeypatch)
    out = tmp_path / "theirs.safetensors"
    assert hap_export([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hap-export: ") and ".metadata" in err and "--trust-checkpoint" in err
    assert "Traceback" not in err and not out.exists()
    assert hap_export([str(path), "--out", str(out), "--trust-checkpoint"]) == 0
    assert set(load_file(out)) == set(model.state_dict())


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                     SafetensorError("Error while serializing: I/O error: No space left on device "
                                                     "(os error 28)")], ids=["OSError", "SafetensorError"])
def test_a_failed_write_leaves_the_old_out_file_and_no_temporary(tmp_path, monkeypatch, capsys, failure):
    import safetensors.torch

    path, _ = _save_rotary(tmp_path / "ck")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.safetensors"
    out.write_bytes(b"the previous export")
    real_save = safetensors.torch.save_file

    def half_then_full_disk(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[:len(data) // 2])
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full_disk)
    assert hap_export([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hap-export: ") and str(out) in err and "space" in err and "Traceback" not in err
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in out_dir.iterdir()] == ["m.safetensors"]


def _drop_recorded_sizes(step_dir: Path) -> None:
    meta = json.loads((step_dir / ckpt.META).read_text())
    del meta["files"]  # as in a checkpoint written before hap recorded its files' sizes
    (step_dir / ckpt.META).write_text(json.dumps(meta))


def _truncate_distcp(step_dir: Path) -> None:
    (f,) = step_dir.glob("*.distcp")
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def _disagree_with_metadata(step_dir: Path) -> None:
    meta = json.loads((step_dir / ckpt.META).read_text())
    meta["layout"]["proj.bias"]["shape"] = [7]
    (step_dir / ckpt.META).write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [
    [_truncate_distcp],  # the recorded sizes tell
    [_drop_recorded_sizes, _truncate_distcp],  # only reading the data tells
    [_disagree_with_metadata],  # hap.json's layout is not what .metadata holds
], ids=["truncated", "truncated-unrecorded-sizes", "layout-mismatch"])
def test_a_torn_checkpoint_exits_2_with_a_message_not_a_traceback(tmp_path, capsys, damage):
    path, _ = _save_rotary(tmp_path / "ck")
    for f in damage:
        f(path)
    out = tmp_path / "m.safetensors"
    assert hap_export([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hap-export: ") and str(path) in err and "Traceback" not in err, err
    assert not out.exists()


def test_exporting_what_is_not_a_checkpoint_exits_2_and_says_why(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert hap_export([str(tmp_path / "empty"), "--out", str(tmp_path / "x.safetensors")]) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ckpt.META).write_text(json.dumps({"weights": 1}))
    assert hap_export([str(tmp_path / "other"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and "not a checkpoint of this hap" in err
    assert not (tmp_path / "x.safetensors").exists()

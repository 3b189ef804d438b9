"""hap-export: a sharded checkpoint as the single-device state_dict in safetensors, shards
assembled and tied weights included."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from hap.export import main as hap_export
from hap.runtime import checkpoint as ckpt
from tests.helpers import load_example


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
    ckpt.save(tmp_path / "ck", 7, tensors, {"layout": layout, "optimizer": {}, "buffers": {}}, 0, lambda: None)
    assert {"model/tok.weight/0", "model/tok.weight/1", "model/ln_f.bias"} <= ckpt.stored_keys(
        str(tmp_path / "ck" / "step_000007"))
    assert hap_export([str(tmp_path / "ck"), "--out", str(tmp_path / "model.safetensors")]) == 0
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    fresh = gpt.model()
    fresh.load_state_dict(loaded)
    assert fresh.head.weight is fresh.tok.weight and torch.equal(fresh.tok.weight, state["tok.weight"])
    assert "wrote" in capsys.readouterr().out


def test_exporting_what_is_not_a_checkpoint_exits_2_and_says_why(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert hap_export([str(tmp_path / "empty"), "--out", str(tmp_path / "x.safetensors")]) == 2
    (tmp_path / "other").mkdir()
    torch.save({"weights": 1}, tmp_path / "other" / ckpt.META)
    assert hap_export([str(tmp_path / "other"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and "not a checkpoint of this hap" in err
    assert not (tmp_path / "x.safetensors").exists()

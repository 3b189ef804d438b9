"""Reading a HuggingFace checkpoint by slices (hap.runtime.pretrained): a rank's slice of each
tensor, one file or shards with an index, and a clear message for what does not fit."""
from __future__ import annotations

import json

import pytest
import torch

from hap.runtime.pretrained import Pretrained, PretrainedError

safetensors = pytest.importorskip("safetensors.torch")


@pytest.fixture
def one_file(tmp_path):
    torch.manual_seed(0)
    tensors = {"wte.weight": torch.randn(10, 4), "ln.bias": torch.randn(4), "half.weight": torch.randn(6, 3).bfloat16()}
    safetensors.save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


def test_a_rank_reads_its_rows_and_only_those(one_file):
    d, tensors = one_file
    ck = Pretrained(d, "m.")
    got = ck.read(("m.wte.weight",), (10, 4), torch.float32, 0, 3, 4)
    assert torch.equal(got, tensors["wte.weight"][3:7])
    assert torch.equal(ck.read(("m.ln.bias",), (4,), torch.float32, None, 0, 0), tensors["ln.bias"])
    assert ck.read_bytes == 4 * 4 * 4 + 4 * 4


def test_tied_weights_are_found_under_any_of_their_keys_and_a_cast_is_recorded(one_file):
    d, tensors = one_file
    ck = Pretrained(d, "m.")
    assert torch.equal(ck.read(("m.lm_head.weight", "m.wte.weight"), (10, 4), torch.float32, 1, 1, 2),
                       tensors["wte.weight"][:, 1:3])
    got = ck.read(("m.half.weight",), (6, 3), torch.float32, None, 0, 0)
    assert got.dtype == torch.float32 and ck.casts == {("bfloat16", "float32")}


def test_shards_with_an_index(tmp_path):
    a, b = torch.randn(4, 2), torch.randn(3)
    safetensors.save_file({"a": a}, str(tmp_path / "model-1.safetensors"))
    safetensors.save_file({"b": b}, str(tmp_path / "model-2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    ck = Pretrained(tmp_path)
    assert torch.equal(ck.read(("b",), (3,), torch.float32, 0, 1, 2), b[1:])
    assert torch.equal(ck.read(("a",), (4, 2), torch.float32, None, 0, 0), a)


def test_what_does_not_fit_is_said_clearly(one_file, tmp_path):
    d, _ = one_file
    with pytest.raises(PretrainedError, match="PRETRAINED_PREFIX 'x.'.*e.g. 'm.'"):
        Pretrained(d, "x.").read(("x.nothing.weight",), (2,), torch.float32, None, 0, 0)
    with pytest.raises(PretrainedError, match=r"wte.weight is \[10, 4\].*\[12, 4\].*another size"):
        Pretrained(d, "m.").read(("m.wte.weight",), (12, 4), torch.float32, 0, 0, 6)
    with pytest.raises(PretrainedError, match="neither model.safetensors nor"):
        Pretrained(tmp_path / "empty")


def test_a_scalar_is_read_whole(tmp_path):
    safetensors.save_file({"bn.num_batches_tracked": torch.tensor(7)}, str(tmp_path / "model.safetensors"))
    got = Pretrained(tmp_path).read(("bn.num_batches_tracked",), (), torch.int64, None, 0, 0)
    assert got.shape == () and int(got) == 7

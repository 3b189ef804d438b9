"""Fine-tuning from a local HuggingFace checkpoint (examples/hf_finetune.py): the program equals
single-device fine-tuning from the same checkpoint, and each rank reads only the slices it holds."""
from __future__ import annotations

import json

import pytest

from hap.placement import Splitter
from hap.spec import capture_spec, load_spec
from tests.e2e.harness import ROOT, run_exact

SPEC = str(ROOT / "examples" / "hf_finetune.py")


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    directory = tmp_path / "tiny-gpt2"
    monkeypatch.setenv("HAP_PRETRAINED", str(directory))  # read by the spec here and by every rank
    load_spec(SPEC).save_tiny(directory)
    return directory


@pytest.mark.parametrize("cluster", ["default", "cpu-1-2-4"])
def test_fine_tuning_reads_each_ranks_slices_and_equals_one_device(checkpoint, cluster, tmp_path):
    graph = capture_spec(load_spec(SPEC))
    weights = {n.name: "S(0)" for n in graph.params() if len(n.meta.shape) == 2}  # every matrix sharded
    plan, loss_err, param_err = run_exact(SPEC, str(ROOT / "profiles" / "clusters" / f"{cluster}.toml"), tmp_path,
                                          steps=5, pins=weights)
    assert loss_err <= 1e-5 and param_err <= 1e-4, (loss_err, param_err)
    read = json.loads((tmp_path / "log.json").read_text())["pretrained_read_bytes"]
    # what each rank holds of the checkpoint: its rows of every matrix, every vector whole
    held = [0] * plan.num_ranks
    for node in graph.params():
        size = 4 * node.meta.numel // node.meta.shape[0] if node.name in weights else 4 * node.meta.numel
        for r in range(plan.num_ranks):
            rows = Splitter(plan.shares).lengths(node.meta.shape[0])[r] if node.name in weights else 1
            held[r] += size * rows
    assert read == held, (read, held)
    total = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    assert all(r < 0.8 * total for r in read), (read, total)

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


def test_a_trained_checkpoint_exports_to_a_directory_transformers_loads(checkpoint, tmp_path, capsys):
    """hap-export --hf: sharded safetensors with an index and the checkpoint's config; the loaded
    model's logits equal the trained program's parameters' logits."""
    import torch
    import transformers as tf

    from hap.emit import emit_program
    from hap.export import main as export_main
    from tests.e2e.harness import plan_for, torchrun

    graph = capture_spec(load_spec(SPEC))
    pins = {n.name: "S(0)" for n in graph.params() if len(n.meta.shape) == 2}
    plan = plan_for(SPEC, str(ROOT / "profiles" / "clusters" / "cpu-1-2-4.toml"), pins)
    emit_program(plan, tmp_path / "out", spec=SPEC)
    p = torchrun(plan.num_ranks, tmp_path / "out" / "train.py",
                 ["--steps", "2", "--lr", "0.05", "--save", str(tmp_path / "ck"),
                  "--dump-params", str(tmp_path / "p.pt")])
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "hf"
    assert export_main([str(tmp_path / "ck"), "--hf", str(out), "--spec", SPEC, "--max-shard-size", "100KB"]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "config.json").read_text() == (checkpoint / "config.json").read_text()
    loaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    spec = load_spec(SPEC)
    trained = spec.model().eval()
    trained.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    ids = spec.batch(0, 4)[0]
    with torch.no_grad():
        want = trained.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert not torch.equal(want, tf.AutoModelForCausalLM.from_pretrained(checkpoint).eval()(input_ids=ids).logits)
    assert torch.equal(got, want)


def test_exporting_to_a_directory_that_holds_files_changes_nothing(checkpoint, tmp_path, capsys):
    from hap.export import main as export_main

    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert export_main([str(tmp_path / "no-ck"), "--hf", str(out), "--spec", SPEC]) == 2
    assert "not an empty directory" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep me"

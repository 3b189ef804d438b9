"""The Python API as the README shows it: synthesize → summary → emit."""
from __future__ import annotations

import hap
from tests.helpers import ROOT, load_example


def test_synthesize_summary_and_emit(tmp_path):
    mod = load_example("cnn")
    plan = hap.synthesize(mod.model(), mod.batch(0, mod.BATCH_SIZE),
                          cluster=str(ROOT / "profiles" / "clusters" / "cpu-1-2-4.toml"))
    assert isinstance(plan, hap.Plan) and plan.num_ranks == 3 and plan.global_batch == mod.BATCH_SIZE
    text = plan.summary()
    assert "dp_even" in text and "lower bound" in text and "conv" in text
    out = plan.emit(tmp_path / "out", spec=str(ROOT / "examples" / "cnn.py"))
    assert out.name == "train.py" and (tmp_path / "out" / "plan.json").exists()
    again = hap.Plan.load(tmp_path / "out" / "plan.json")
    assert again.shares == plan.shares and again.nodes == plan.nodes


def test_default_cluster_is_the_embedded_emulated_pair():
    mod = load_example("mlp")
    plan = hap.synthesize(mod.model(), mod.batch(0, 16))
    assert [r.slowdown for r in plan.cluster.ranks] == [1.0, 3.0]
    assert plan.shares[0] > plan.shares[1]

"""hap-bench (hap.bench): the matrix file, its references, and --check on a real (tiny) cell."""
from __future__ import annotations

import json
import re

import pytest

from hap.bench.matrix import MatrixError, evaluate, load_matrix
from hap.bench.run import main

CELL = '''[run]
steps = 4
warmup = 1
rounds = 1

[[cell]]
name = "tiny"
spec = "examples/mlp.py"
clusters = ["profiles/clusters/default.toml"]
strategies = ["hap", "ddp_even"]
'''


def test_a_matrix_expands_its_cells_and_reads_its_references(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(CELL.replace('strategies', 'precisions = ["fp32", "bf16"]\nstrategies')
                    + 'check = ["speedup_vs_ddp_even >= 1.5", "pred_err <= 0.2"]\n')
    m = load_matrix(path)
    assert [c.name for c in m.cells] == ["tiny/default/fp32", "tiny/default/bf16"]
    assert m.run["steps"] == 4 and m.run["exact_steps"] == 3
    assert evaluate("speedup_vs_ddp_even >= 1.5", {"speedup_vs_ddp_even": 1.6}) == (True, "speedup_vs_ddp_even >= "
                                                                                     "1.5: measured 1.6")
    assert not evaluate("pred_err <= 0.2", {"pred_err": 0.3})[0]
    assert not evaluate("pred_err <= 0.2", {})[0], "a reference whose metric was not measured fails"


@pytest.mark.parametrize("edit, says", [
    (('"hap", "ddp_even"', '"hap", "ddp_uneven"'), "ddp_uneven"),
    (('"hap", "ddp_even"', '"ddp_even"'), "each cell runs 'hap'"),
    (("[[cell]]", "[[cell]]\ncheck = [\"speedup_vs_fsdp2 >= 2\"]"), "METRIC OP NUMBER"),
    (("warmup = 1", "warmup = 4"), "leaves no step"),
    (("examples/mlp.py", "examples/nope.py"), "nope.py does not exist"),
])
def test_a_wrong_matrix_says_where_and_what(tmp_path, edit, says):
    path = tmp_path / "m.toml"
    path.write_text(CELL.replace(*edit))
    with pytest.raises(MatrixError, match=says):
        load_matrix(path)


def test_check_fails_on_a_cell_whose_reference_is_above_what_it_measures(tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_text(CELL + 'check = ["speedup_vs_ddp_even >= 0.001", "speedup_vs_ddp_even >= 1000"]\n')
    assert main([str(path), "--out", str(tmp_path / "out"), "--check"]) == 1
    assert "tiny/default/fp32 is below its reference: speedup_vs_ddp_even >= 1000" in capsys.readouterr().err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    cell = res["cells"][0]
    assert cell["exact"]["ok"] and cell["exact"]["loss_err"] <= 1e-4
    assert [c["ok"] for c in cell["checks"]] == [True, False]
    hap, ddp = cell["strategies"]["hap"], cell["strategies"]["ddp_even"]
    assert len(hap["step_ms"][0]) == len(ddp["step_ms"][0]) == 3  # 4 steps, 1 dropped
    assert hap["min_ms"] <= hap["median_ms"] <= hap["max_ms"] and "predicted_ms" in hap
    # hap's step phase by phase, measured against predicted; the measured phases sum to about its step
    from hap.runtime.logger import PHASES

    assert list(hap["phases_ms"]) == list(PHASES) and hap["phases_ms"]["compute"]["measured"] > 0
    assert sum(v["predicted"] for v in hap["phases_ms"].values()) == pytest.approx(hap["predicted_ms"], rel=1e-6)
    phase_rows = (tmp_path / "out" / "table.md").read_text().split("measured (predicted)")[1]
    assert "| tiny/default/fp32 | hap | " in phase_rows
    assert res["environment"]["commit"] and res["environment"]["versions"]["torch"]
    assert (tmp_path / "out" / "steps.png").stat().st_size > 0
    assert "| tiny/default/fp32" in (tmp_path / "out" / "table.md").read_text()


@pytest.mark.parametrize("strategy, shares", [("ddp", "40,24"), ("fsdp2", "32,32")])
def test_the_torch_baselines_train_what_one_device_trains(tmp_path, strategy, shares):
    from hap.bench.reference import reference
    from tests.e2e.harness import torchrun

    log = tmp_path / "log.json"
    p = torchrun(2, "hap.bench.torch_baseline", ["--spec", "examples/mlp.py", "--strategy", strategy,
                                                 "--global-batch", "64", "--shares", shares, "--steps", "3",
                                                 "--lr", "0.05", "--log-json", str(log)], extra=("-m",))
    assert p.returncode == 0, p.stderr[-2000:]
    want, _ = reference("examples/mlp.py", 3, 0.05, 64)
    got = json.loads(log.read_text())["losses"]
    assert got == pytest.approx(want, rel=1e-5), (got, want)


def test_a_pipelined_strategy_records_which_pipeline_it_ran(tmp_path):
    from hap.bench.prepare import main as prepare
    from tests.helpers import ROOT

    # two one-rank nodes joined at 0.02 Gbit/s: "auto" cuts the GPT into two stages
    cluster = tmp_path / "slower-net.toml"
    cluster.write_text((ROOT / "profiles/clusters/cpu-slow-net.toml").read_text()
                       .replace("inter_node_gbps = 0.1", "inter_node_gbps = 0.02"))
    assert prepare(["--spec", str(ROOT / "examples/gpt.py"), "--cluster", str(cluster), "--strategies",
                    "hap,hap:1_stage", "--out", str(tmp_path / "out"), "--exact-steps", "1"]) == 0
    done = json.loads((tmp_path / "out" / "prepared.json").read_text())["hap"]
    assert done["hap"]["plan"] == "hap_pipeline"
    assert re.fullmatch(r"2 stages, (1F1B|1F1B \(warm-up \+\d+\)|GPipe), \d+ micro-batch(es)?, bubble \d+%",
                        done["hap"]["pipeline"])
    assert "pipeline" not in done["hap:1_stage"]

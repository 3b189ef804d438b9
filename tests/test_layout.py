"""The layout: the one value an emitted train.py hands the runtime."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hap.api import plan_graph
from hap.cluster import load_cluster
from hap.emit import emit_program
from hap.runtime.layout import FORMAT, Layout
from tests.helpers import ROOT, captured, emitted_layout, load_example


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory):
    """An uneven tensor-parallel MLP on 3 ranks: sharded weights whose lengths follow the shares."""
    graph = captured(load_example("mlp"))[2]
    plan = plan_graph(graph, load_cluster(ROOT / "profiles/clusters/cpu-1-2-4.toml"),
                      pins={"p_hidden_1_weight": "S(0)"})
    out = tmp_path_factory.mktemp("layout")
    path = emit_program(plan, out, spec=str(ROOT / "examples/mlp.py"))
    return plan, path, emitted_layout(path.read_text())


def test_train_py_states_its_plan_as_one_frozen_layout(tensor_parallel):
    plan, _, layout = tensor_parallel
    assert layout.format == FORMAT and layout.shares == tuple(plan.shares) and layout.rows == layout.shares
    assert layout.params["p_hidden_1_weight"].sharded
    with pytest.raises(AttributeError):
        layout.shares = (1, 2, 3)
    with pytest.raises(TypeError):
        layout.params["p_hidden_1_weight"] = None
    assert Layout.from_json(layout.to_json()) == layout


def test_new_shares_give_a_new_layout_whose_sharded_lengths_follow(tensor_parallel):
    _, _, layout = tensor_parallel
    new = (layout.global_batch - 2, 1, 1)
    moved = layout.with_shares(new).placed(2, torch.device("cpu"))
    assert moved.shares == moved.rows == new and moved.rank == 2 and layout.rank == 0
    w = moved.params["p_hidden_1_weight"]
    size, unit = w.split
    assert sum(w.lengths) == size and w.lengths != layout.params["p_hidden_1_weight"].lengths
    assert all(sum(ls) == size for (size, _), ls in moved.lengths.items())
    assert moved.with_rows((1, 0, 1)).rows == (1, 0, 1) and moved.with_rows((1, 0, 1)).shares == new


def test_a_program_of_another_format_is_refused_with_the_command_to_re_emit(tensor_parallel, tmp_path):
    _, path, _ = tensor_parallel
    other = tmp_path / "train.py"
    other.write_text(path.read_text().replace(f"    {FORMAT},  # the layout format", f"    {FORMAT + 1},  #"))
    p = subprocess.run([sys.executable, str(other), "--steps", "1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"layout is format {FORMAT + 1}" in p.stderr and "hap-plan" in p.stderr and "--emit" in p.stderr


def test_a_program_of_module_constants_is_refused_with_the_command_to_re_emit(tmp_path):
    old = tmp_path / "train.py"
    old.write_text("import sys\nimport hap.runtime as hr\nSPEC = 'model.py'\nOPTIMIZER = 'sgd'\n"
                   "hr.program.main(sys.modules[__name__])\n")
    p = subprocess.run([sys.executable, str(old)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "older hap" in p.stderr and "hap-plan model.py --emit DIR --force" in p.stderr


def test_the_forward_reads_only_its_layout(tensor_parallel):
    _, path, _ = tensor_parallel
    text = path.read_text()
    assert "def forward(layout, params, buffers, batch):" in text
    code = compile(text, "train.py", "exec")
    forward = next(c for c in code.co_consts if getattr(c, "co_name", "") == "forward")
    assert not set(forward.co_names) & {"RANK", "ROWS", "LENGTHS", "DEVICE", "LAYOUT"}, forward.co_names

"""The emitted train.py: readable, self-describing, planner-free, shape arguments local."""
from __future__ import annotations

import ast
import re

import pytest

from hap.api import plan_graph
from hap.cluster import load_cluster
from hap.emit import emit_program
from hap.errors import HapError
from hap.rules.loss import chunked_losses
from tests.helpers import ROOT, captured, load_example


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    graph = captured(load_example("gpt"))[2]
    plan = plan_graph(graph, load_cluster(ROOT / "profiles" / "clusters" / "cpu-1-2-4.toml"))
    out = tmp_path_factory.mktemp("emit")
    emit_program(plan, out, spec=str(ROOT / "examples" / "gpt.py"))
    return plan, (out / "train.py").read_text()


def test_docstring_has_command_digest_and_ranks(program):
    plan, text = program
    doc = ast.get_docstring(ast.parse(text))
    assert "torchrun --standalone --nproc-per-node 3" in doc
    assert plan.digest() in doc
    assert all(f"rank {r}" in doc for r in range(3))


def test_imports_only_torch_and_the_runtime(program):
    _, text = program
    mods = {n.names[0].name if isinstance(n, ast.Import) else n.module
            for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert not any(m.startswith(("hap.solve", "hap.api", "hap.cost", "pulp")) for m in mods)
    assert {m for m in mods if m.startswith("hap")} <= {"hap.runtime", "hap.runtime.sharded_ops"}


def test_every_forward_line_names_placements_and_source(program):
    plan, text = program
    body = text[text.index("def forward"):text.index("def main")]
    ops = [line for line in body.splitlines() if re.match(r"\s+\w+ = (aten\.|hr\.|[a-z_0-9]+\[\d)", line)]
    unwritten = {x for c in chunked_losses(plan.graph).values() for x in c.skipped}  # run by the chunked loss
    assert unwritten and len(ops) >= len(plan.graph.ops()) - len(unwritten)
    for line in ops:
        assert "#" in line and ("examples/gpt.py:" in line or "->" in line), line


def test_view_shapes_are_local(program):
    plan, text = program
    views = [line for line in text.splitlines() if "aten.view.default(" in line]
    assert views and all("n16" in v or "[16," not in v for v in views), "batch dims must use the local length"
    assert "LENGTHS" in text and str(plan.shares) in text.replace("[", "(").replace("]", ")") or str(
        tuple(plan.shares)) in text


def test_emit_needs_a_spec_and_refuses_non_empty_dirs(tmp_path, program):
    plan, _ = program
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(HapError, match="--force"):
        emit_program(plan, tmp_path, spec=str(ROOT / "examples" / "gpt.py"))
    assert (tmp_path / "mine.txt").read_text() == "keep"
    with pytest.raises(HapError, match="spec"):
        emit_program(plan, tmp_path / "new", spec=None)


def test_the_program_is_its_plan_and_a_short_main(program):
    """train.py holds what the plan decides (tables, the forward over local shards); the fixed
    training loop is hap.runtime's, linted and tested once, not a template in every program."""
    _, text = program
    tree = ast.parse(text)
    assert [f.name for f in tree.body if isinstance(f, ast.FunctionDef)] == ["forward", "main"]
    main = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "main")
    assert len(main.body) == 1 and "hr.program.main" in ast.unparse(main)




def test_the_plan_carries_its_choice_so_emit_runs_no_rules(program, tmp_path, monkeypatch):
    """Emitting a plan (here reloaded from plan.json) needs no rule: with every rule gone, the
    same program comes out."""
    import hap.rules
    from hap.plan import Plan

    plan, text = program
    again = Plan.from_json(plan.to_json())
    monkeypatch.setattr(hap.rules, "RULES", {})
    emit_program(again, tmp_path / "out", spec=str(ROOT / "examples" / "gpt.py"))
    body = (tmp_path / "out" / "train.py").read_text()
    assert body[body.index("def forward"):] == text[text.index("def forward"):]

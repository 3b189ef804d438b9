"""The placement MILP: where PuLP cannot run HiGHS, CBC solves the same problem."""
from __future__ import annotations

import pulp
import pytest

from hap.cluster import load_cluster
from hap.cost import CostModel
from hap.placement import Splitter
from hap.rules import RuleContext, view_units
from hap.solve import all_candidates, solve_placements, speed_shares
from tests.helpers import ROOT, captured, load_example


@pytest.fixture(scope="module")
def mlp_problem():
    graph = captured(load_example("mlp"))[2]
    cluster = load_cluster(ROOT / "profiles" / "clusters" / "hap-paper.toml")
    batch = next(n for n in graph if n.kind == "input").meta.shape[0]
    shares = speed_shares(cluster, batch)
    cands = all_candidates(graph, RuleContext(graph, Splitter(shares), view_units(graph)))
    return graph, CostModel(graph, cluster, Splitter(shares)), cands


def _plan(res) -> dict[str, str]:
    return {name: c.name for name, c in res.choice.items()}


def test_cbc_solves_where_highs_cannot_run(mlp_problem, monkeypatch):
    graph, cm, cands = mlp_problem
    by_cbc = solve_placements(graph, cm, cands, solver="cbc")

    refused = []

    def unavailable(self, lp, callback=None):
        refused.append(lp.name)
        raise pulp.PulpSolverError("HiGHS: Not Available")

    monkeypatch.setattr(pulp.HiGHS, "actualSolve", unavailable)
    fallback = solve_placements(graph, cm, cands)
    assert refused == ["hap_placements"]
    assert _plan(fallback) == _plan(by_cbc)
    assert fallback.objective == pytest.approx(by_cbc.objective, rel=1e-6)


def test_highs_and_cbc_agree(mlp_problem):
    graph, cm, cands = mlp_problem
    highs, cbc = solve_placements(graph, cm, cands), solve_placements(graph, cm, cands, solver="cbc")
    assert highs.objective == pytest.approx(cbc.objective, rel=1e-6)


@pytest.mark.parametrize("extra,together", [({}, True), ({"layer_norm_1": "R"}, False)],
                         ids=["only-gathers", "with-activation-gathers"])
def test_a_block_starts_all_its_weight_gathers_unless_it_runs_other_collectives(extra, together, tmp_path):
    # a block whose only collectives are its weights' gathers starts them all with the block
    # (they then wait on the link, not on the compute before their use); a block that also
    # gathers an activation starts them one ahead, so that gather does not queue behind them
    # all. The emitted Prefetch, the priced exposure and the memory in flight agree
    from hap.api import plan_spec
    from hap.cost import CostSetup
    from hap.emit import emit_program
    from hap.solve import block_gathers, collective_temporary, evaluate, gathers_ahead, move_places
    from tests.helpers import GPT_GATHERED

    plan = plan_spec(str(ROOT / "examples/gpt.py"), str(ROOT / "profiles/clusters/cpu-1-2-4.toml"),
                     pins={**GPT_GATHERED, **extra})
    emit_program(plan, tmp_path / "out", spec=str(ROOT / "examples/gpt.py"))
    text = (tmp_path / "out" / "train.py").read_text()
    assert text.count("hr.Prefetch(") == 2 and text.count("], ahead=None)") == (2 if together else 0)
    graph, choice = plan.graph, plan.choice()
    cm = CostSetup.of_plan(plan).cost_model(graph, plan.cluster)
    moves = evaluate(graph, cm, choice).moves
    before, _ = move_places(graph, choice, moves)
    blocks = graph.blocks()
    gathers = block_gathers(graph, moves, before)
    assert set(gathers) == {"blocks.0", "blocks.1"} and all(len(g) == 4 for g in gathers.values())
    assert {gathers_ahead(graph, choice, moves, before, blocks[b]) for b in gathers} == ({None} if together else {1})
    def size(m):
        return cm.move_temporary_bytes(cm.moved_meta(graph[m.producer], m.src, m.dst), m.src, m.dst, m.priced)

    sizes = {i: size(moves[i]) for g in gathers.values() for i in g}
    most = max(sum(sizes[i] for i in g) for g in gathers.values())
    assert (collective_temporary(graph, cm, choice, moves) >= most) == together

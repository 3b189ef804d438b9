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

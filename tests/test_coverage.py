"""hap.coverage: captured ops with counts, which have rules, which ran replicated."""
from __future__ import annotations

import json

import torch
from rich.console import Console
from torch import nn

import hap
from hap.coverage import coverage, coverage_table
from hap.plan import Plan


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x, y):
        h = torch.special.i0(self.a(x))  # no sharding rule: runs replicated
        return nn.functional.mse_loss(self.b(torch.relu(h)), y)


def _plan() -> Plan:
    torch.manual_seed(0)
    batch = (torch.randn(8, 8), torch.randn(8, 4))
    return hap.synthesize(Odd(), batch, cluster="profiles/clusters/default.toml", time_limit_s=5)


def test_coverage_counts_rules_and_replicated_ops():
    plan = _plan()
    cov = coverage(plan)
    rows = {r["op"]: r for r in cov["ops"]}
    assert sum(r["count"] for r in cov["ops"]) == cov["nodes"] == len(plan.graph.ops())
    assert rows["aten.linear.default"]["count"] == 2 and rows["aten.linear.default"]["has_rule"]
    i0 = next(r for op, r in rows.items() if "i0" in op)
    assert not i0["has_rule"] and i0["replicated"] == i0["count"] == 1
    assert i0["op"] in cov["no_rule"] and i0["replicated_source"]
    assert cov["replicated"] == sum(r["replicated"] for r in cov["ops"])
    json.dumps(cov)  # plain data


def test_coverage_of_a_reloaded_plan_and_table(tmp_path):
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert coverage(again) == coverage(plan)
    console = Console(record=True, width=200)
    console.print(coverage_table(plan))
    text = console.export_text()
    assert "aten.linear.default" in text and "i0" in text and "no" in text

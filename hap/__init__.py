"""hap: heterogeneous-cluster SPMD program synthesis for PyTorch.

    plan = hap.synthesize(model, example_batch, cluster="profiles/clusters/hap-paper.toml")
    print(plan.summary())
    plan.emit("out/", spec="examples/mlp.py")   # out/train.py + out/plan.json

Importing hap has no side effects; the planner modules load on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "synthesize":
        from hap.api import synthesize

        return synthesize
    if name == "Plan":
        from hap.plan import Plan

        return Plan
    if name == "load_cluster":
        from hap.cluster import load_cluster

        return load_cluster
    raise AttributeError(name)


__all__ = ["Plan", "load_cluster", "synthesize"]

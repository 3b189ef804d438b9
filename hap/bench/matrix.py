"""The benchmark matrix file (TOML): models x clusters x strategies x precisions, with references.

    [run]                       # optional; these are the defaults
    steps = 12                  # steps per run, warm-up included
    warmup = 2                  # steps dropped from each run
    rounds = 2                  # each strategy runs this often, interleaved (A B C A B C)
    exact_steps = 3             # steps of the exactness check against one device
    lr = 0.001

    [[cell]]                    # a group of cells: its clusters x precisions
    name = "mlp-1024"
    spec = "examples/mlp.py"
    env = { HAP_MLP_WIDTH = "1024", HAP_MLP_BATCH = "1024" }   # the spec's sizes
    clusters = ["profiles/clusters/default.toml"]
    precisions = ["fp32", "bf16"]
    strategies = ["hap", "ddp_even", "ddp_proportional", "fsdp2", "hap:fsdp_cephalo"]
    check = ["speedup_vs_ddp_even >= 1.5", "pred_err <= 0.25"]   # references (hap-bench --check)

Strategies: ``hap`` (hap's plan), ``hap:<baseline>`` (one of hap's baselines, emitted and run like
hap's plan: ``hap.baselines.BASELINES``), ``ddp_even`` and ``ddp_proportional`` (torch
DistributedDataParallel on even or speed-proportional shares) and ``fsdp2`` (torch's
``fully_shard``), see ``hap.bench.torch_baseline``. A reference reads ``METRIC OP NUMBER`` with OP
one of >=, <=, >, <, and METRIC one of ``speedup_vs_<strategy>`` (that strategy's median step over
hap's), ``pred_err`` (|predicted - measured| / measured of hap's plan) or ``<strategy>_ms``.
Paths are relative to the matrix file's folder's parent when they do not exist as given.
"""
from __future__ import annotations

import operator
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hap.errors import HapError

TORCH_STRATEGIES = ("ddp_even", "ddp_proportional", "fsdp2")
RUN_DEFAULTS = {"steps": 12, "warmup": 2, "rounds": 2, "exact_steps": 3, "lr": 1e-3}
CELL_KEYS = ("name", "spec", "env", "clusters", "precisions", "strategies", "check")
REFERENCE = re.compile(r"^\s*([a-z0-9_:]+)\s*(>=|<=|>|<)\s*([0-9.eE+-]+)\s*$")
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


class MatrixError(HapError):
    """The matrix file is wrong: where, and how to fix it."""


@dataclass(frozen=True)
class Cell:
    name: str  # "<group>/<cluster stem>/<precision>"
    spec: str
    env: dict[str, str]
    cluster: str
    precision: str
    strategies: tuple[str, ...]
    check: tuple[str, ...] = ()


@dataclass(frozen=True)
class Matrix:
    path: str
    run: dict[str, Any]
    cells: tuple[Cell, ...] = field(default=())


def _resolve(path: str, base: Path) -> str:
    p = Path(path)
    if p.exists():
        return str(p)
    for root in (base, base.parent):
        if (root / p).exists():
            return str(root / p)
    raise MatrixError(f"{path} does not exist (looked here and under {base} and {base.parent})")


def load_matrix(path: str | Path) -> Matrix:
    from hap.baselines import BASELINES

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise MatrixError(f"{path}: {e}") from None
    run = {**RUN_DEFAULTS, **data.get("run", {})}
    unknown = set(run) - set(RUN_DEFAULTS)
    if unknown:
        raise MatrixError(f"{path}: unknown key(s) {sorted(unknown)} in [run]; known: {', '.join(RUN_DEFAULTS)}")
    if run["warmup"] >= run["steps"]:
        raise MatrixError(f"{path}: [run] warmup = {run['warmup']} leaves no step of {run['steps']} to measure")
    known = {"hap", "hap:1_stage", *TORCH_STRATEGIES, *(f"hap:{b}" for b in BASELINES)}
    cells = []
    for i, group in enumerate(data.get("cell", [])):
        where = f"{path}, cell[{i}]"
        bad = set(group) - set(CELL_KEYS)
        if bad:
            raise MatrixError(f"{where}: unknown key(s) {sorted(bad)}; known: {', '.join(CELL_KEYS)}")
        for key in ("name", "spec", "clusters"):
            if key not in group:
                raise MatrixError(f"{where}: '{key}' is required")
        strategies = tuple(group.get("strategies", ["hap", "ddp_even"]))
        wrong = [s for s in strategies if s not in known]
        if wrong or "hap" not in strategies:
            raise MatrixError(f"{where}: strategies {wrong or strategies} (each cell runs 'hap'; known: "
                              f"{', '.join(sorted(known))})")
        checks = tuple(group.get("check", []))
        for c in checks:
            m = REFERENCE.match(c)
            if not m or not _metric_ok(m.group(1), strategies):
                raise MatrixError(f"{where}: reference {c!r} is not METRIC OP NUMBER with METRIC one of "
                                  f"{', '.join(metrics(strategies))}")
        precisions = group.get("precisions", ["fp32"])
        spec = _resolve(group["spec"], path.parent)
        for cluster in group["clusters"]:
            cl = _resolve(cluster, path.parent)
            for precision in precisions:
                cells.append(Cell(f"{group['name']}/{Path(cl).stem}/{precision}", spec,
                                  {str(k): str(v) for k, v in group.get("env", {}).items()}, cl, precision,
                                  strategies, checks))
    if not cells:
        raise MatrixError(f"{path}: no [[cell]] entries")
    return Matrix(str(path), run, tuple(cells))


def metrics(strategies: tuple[str, ...]) -> list[str]:
    return ["pred_err", *(f"speedup_vs_{s}" for s in strategies if s != "hap"), *(f"{s}_ms" for s in strategies)]


def _metric_ok(metric: str, strategies: tuple[str, ...]) -> bool:
    return metric in metrics(strategies)


def evaluate(check: str, values: dict[str, float | None]) -> tuple[bool, str]:
    """(passed, what it says) of a reference against a cell's measured ``values``."""
    metric, op, number = REFERENCE.match(check).groups()
    got = values.get(metric)
    if got is None:
        return False, f"{check}: {metric} was not measured"
    ok = OPS[op](got, float(number))
    return ok, f"{check}: measured {got:.3g}"

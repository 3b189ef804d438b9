"""hap's modules import each other without cycles, and the runtime (what train.py imports)
imports nothing of the planner. Imports inside functions count (they run); imports under
``if TYPE_CHECKING:`` do not (they never run)."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

from tests.helpers import ROOT

PACKAGE = ROOT / "hap"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> list[ast.AST]:
    """Import statements that run, with those under ``if TYPE_CHECKING:`` left out."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def import_graph() -> nx.DiGraph:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from hap import optimer` imports the module hap.optimer, not the package's code
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            g.add_edges_from((name, t) for t in targets if t in modules and t != name)
    return g


def test_no_import_cycles():
    cycles = sorted(nx.simple_cycles(import_graph()), key=len)
    assert not cycles, "import cycles among hap's modules:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def test_the_runtime_imports_nothing_of_the_planner():
    g = import_graph()
    for module in (m for m in g if m.startswith("hap.runtime")):
        outside = [t for t in g.successors(module) if not t.startswith("hap.runtime") and t != "hap"]
        assert not outside, f"{module} imports {outside}: an emitted train.py must need only torch and hap.runtime"


def test_the_machine_layer_is_the_bottom():
    """Device profiles and the α-β formula sit below the cluster file, the cost model, the profiler
    and the calibration, so none of them reaches back up."""
    g = import_graph()
    assert set(g.successors("hap.machine")) <= {"hap.errors"}
    for user in ("hap.cluster", "hap.cost", "hap.profile", "hap.calibrate"):
        assert nx.has_path(g, user, "hap.machine"), user
        assert not nx.has_path(g, "hap.machine", user)

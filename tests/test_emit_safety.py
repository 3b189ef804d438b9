"""train.py is code hap wrote: a name, path or plan.json field is written into it as data (a
string literal, an escaped docstring or comment) or refused, never pasted in as code."""
from __future__ import annotations

import ast
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from hap.api import plan_graph
from hap.capture import capture
from hap.cluster import load_cluster
from hap.errors import HapError, PlanFileError
from hap.plan import Plan
from tests.helpers import ROOT, captured, emitted_layout, load_example

SPEC = str(ROOT / "examples" / "mlp.py")
CLUSTER = ROOT / "profiles" / "clusters" / "cpu-1-2-4.toml"
MARK = "HAP_INJECTED"  # the call every payload tries to smuggle into train.py
# closes a docstring of either quote, ends a comment's line, breaks a string escape, and holds
# a byte no Python source may contain: pasted anywhere unescaped, train.py breaks or runs MARK
PAYLOAD = f'a"""\n{MARK}()\n"""\'\'\'\\U\\N{{x\x00'
NAMES = [
    f'x"""\n{MARK}()\n"""',
    f"x'''\n{MARK}()\n'''",
    "\\U0001F600 \\N{ \\x",
    f"x\n{MARK}()",
    f"x\r{MARK}()",
    "x\x00y",
    "x\ud800y",  # a lone surrogate: not UTF-8 unless escaped
    f"x\u2028{MARK}()\u202e",
    "x\\",
]


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(x), labels, ignore_index=3)  # written into train.py


@pytest.fixture(scope="module")
def mlp_plan() -> Plan:
    """A data-parallel MLP whose blocks are recomputed (block functions and their comments)."""
    graph = captured(load_example("mlp"))[2]
    return plan_graph(graph, load_cluster(CLUSTER), recompute="all")


@pytest.fixture(scope="module")
def classifier_plan() -> Plan:
    """A class loss (its ignore index is written into train.py) and a pinned shard (moves)."""
    torch.manual_seed(0)
    graph = capture(Classifier(), (torch.randn(12, 8), torch.randint(0, 4, (12,))))
    return plan_graph(graph, load_cluster(CLUSTER), pins={"p_fc_weight": "S(0)"})


def emitted(plan: Plan, out) -> str:
    return plan.emit(out, spec=SPEC, force=True).read_text(encoding="utf-8")


def strict_compile(src: str) -> None:
    """Compile train.py with warnings as errors: no SyntaxError, null byte or invalid escape."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(src, "train.py", "exec")


def injected(src: str) -> list[str]:
    """Where MARK appears in train.py as code (it may appear in strings, docstrings, comments)."""
    tree = ast.parse(src)
    return [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == MARK]


def top_level(src: str) -> list[str]:
    """train.py's module-level statements, by kind and the names they bind."""
    out = []
    for s in ast.parse(src).body:
        names = [ast.unparse(t) for t in getattr(s, "targets", [])] + [getattr(s, "name", "")]
        out.append(f"{type(s).__name__} {' '.join(names)}")
    return out


def run_definitions(src: str) -> list:
    """Execute train.py as an imported module (its definitions, not main); MARK records calls."""
    calls: list = []
    exec(compile(src, "train.py", "exec"), {"__name__": "emitted_train", MARK: lambda *a: calls.append(a)})
    return calls


def evil_copy(plan: Plan, name: str) -> Plan:
    """``plan`` with ``name`` as its cluster, device, model and strategy name, in an op's source,
    and as the label of a recomputed block; one node per rank, so the docstring has a command
    line per node."""
    d = json.loads(json.dumps(plan.to_json()))
    d["strategy"] = name
    d["graph"]["model_name"] = name
    cluster = d["cluster"]
    cluster["name"] = name
    cluster["devices"] = {name: next(iter(cluster["devices"].values()))}
    for r in cluster["ranks"]:
        r["device"], r["node"] = name, r["rank"]
    ops = [n for n in d["graph"]["nodes"] if n["kind"] == "op"]
    ops[1]["source"] = f"{name}  {name}"
    old = plan.recompute[0]
    label = f"{name}.0"
    for n in ops:
        if n["module"].startswith(old + " ") or n["module"].startswith(old + "."):
            n["module"] = label + n["module"][len(old):]
    d["recompute"] = [label if b == old else b for b in d["recompute"]]
    again = Plan.from_json(d)
    assert label in again.graph.blocks()
    return again


@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
def test_user_names_are_text_in_docstring_and_comments(mlp_plan, tmp_path, name):
    clean = emitted(mlp_plan, tmp_path / "clean")
    src = emitted(evil_copy(mlp_plan, name), tmp_path / "evil")
    strict_compile(src)
    assert all(c.isprintable() for c in src.replace("\n", "")), "a reader sees every character of train.py"
    assert not injected(src)
    assert top_level(src) == top_level(clean)
    assert run_definitions(src) == []
    doc = ast.get_docstring(ast.parse(src))
    assert sum(line.startswith("  rank ") for line in doc.splitlines()) == len(mlp_plan.shares)
    assert "torchrun --nnodes 3" in doc
    if MARK in name:
        assert MARK in doc  # a person reads what the name was
    assert emitted_layout(src).devices == (name,) * len(mlp_plan.shares)  # data, written with repr


def edited(plan: Plan, tmp_path, edit) -> Plan:
    """``plan`` saved as plan.json, edited there by ``edit(json)``, and loaded again."""
    path = tmp_path / "plan.json"
    d = plan.to_json()
    edit(d)
    path.write_text(json.dumps(d))
    return Plan.load(path)


TARGETS = ["os.system", "builtins.eval", "eval", "aten.relu", "aten.no_such_op.default",
           f"aten.relu.default({MARK}()) or aten.relu.default", "torch.ops.aten.relu.default",
           "hr.all_reduce.default", "operator.getitem", "aten.relu.default.default", "aten..default", ""]


@pytest.mark.parametrize("target", TARGETS)
def test_an_edited_op_target_is_refused(mlp_plan, tmp_path, target):
    def edit(d):
        node = next(n for n in d["graph"]["nodes"] if n["name"] == "relu")
        node["target"] = d["nodes"]["relu"]["target"] = target

    plan = edited(mlp_plan, tmp_path, edit)
    with pytest.raises(PlanFileError) as e:
        plan.emit(tmp_path / "out", spec=SPEC)
    assert repr(target) in str(e.value) and "relu" in str(e.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_ops_resolve_through_torch_ops_in_any_namespace():
    """A torch.library op of another namespace is a registered overload as aten's are."""
    from hap.emit import check_target

    @torch.library.custom_op("hap_emit_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    check_target("hap_emit_test.twice.default", "twice")
    check_target("aten.mm.default", "mm")
    check_target("getitem", "getitem")
    check_target("torch.tensor", "lifted_tensor_0")
    with pytest.raises(PlanFileError, match="hap_emit_test.thrice"):
        check_target("hap_emit_test.thrice.default", "thrice")


BAD_NAMES = ["class", "None", "y; HAP_INJECTED()", f"y\n{MARK}()", "1y", "y-1", "", "y.z", "aten", "torch", "sum",
             "LENGTHS"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_graph_name_must_be_a_free_identifier(mlp_plan, tmp_path, bad):
    def rename(obj):  # the batch input y, everywhere the plan names it
        if isinstance(obj, dict):
            return {(bad if k == "y" else k): (bad if k in ("node", "name") and v == "y" else rename(v))
                    for k, v in obj.items()}
        if isinstance(obj, list):
            return [rename(x) for x in obj]
        return obj

    def edit(d):
        d["graph"] = rename(d["graph"])
        d["nodes"] = rename(d["nodes"])

    plan = edited(mlp_plan, tmp_path, edit)
    assert bad in plan.graph
    with pytest.raises(PlanFileError) as e:
        plan.emit(tmp_path / "out", spec=SPEC)
    assert repr(bad) in str(e.value)
    assert not (tmp_path / "out").exists()


def _places(d, path=()):
    """Every value and every dict key of a JSON document, by path."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield "key", (*path, k)
            yield from _places(v, (*path, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _places(v, (*path, i))
    else:
        yield "value", path


def _representatives(d) -> set:
    """Indices and names of the graph nodes whose fields are edited: the first of each kind and
    target (the others are written by the same lines of hap.emit)."""
    seen, keep = set(), set()
    for i, n in enumerate(d["graph"]["nodes"]):
        key = (n["kind"], n["target"] if n["kind"] == "op" else "")
        if key not in seen:
            seen.add(key)
            keep |= {i, n["name"]}
    return keep


def _put(d, kind, path, payload):
    *up, last = path
    for k in up:
        d = d[k]
    if kind == "value":
        d[last] = payload
    else:
        items = list(d.items())
        d.clear()
        d.update((payload if k == last else k, v) for k, v in items)


@pytest.mark.parametrize("which", ["mlp_plan", "classifier_plan"])
def test_no_plan_json_field_becomes_code(request, tmp_path, which):
    """Each value and key of plan.json in turn holds PAYLOAD: loading and emitting it either
    refuses with a HapError or writes a train.py that compiles and never calls MARK. (The
    device profiles' measurements are skipped: nothing of them is written into train.py; of the
    graph's nodes, one of each kind and target.)"""
    plan = request.getfixturevalue(which)
    d = plan.to_json()
    text = json.dumps(d)
    out = tmp_path / "out"
    keep = _representatives(d)
    failures = []
    for kind, path in _places(d):
        if path[:2] == ("cluster", "devices") and len(path) > 3:
            continue
        node = path[2] if path[:2] == ("graph", "nodes") and len(path) > 2 else \
            path[1] if path[0] == "nodes" and len(path) > 1 else None
        if node is not None and node not in keep:
            continue
        e = json.loads(text)
        _put(e, kind, path, PAYLOAD)
        try:
            src = emitted(Plan.from_json(e), out)
        except HapError:
            continue
        except Exception as ex:  # noqa: BLE001 (the test names every other exception)
            failures.append(f"{kind} {path}: {type(ex).__name__}: {ex}"[:200])
            continue
        try:
            if injected(src):
                failures.append(f"{kind} {path}: runs {MARK}")
            strict_compile(src)
        except (SyntaxError, ValueError, SyntaxWarning, DeprecationWarning) as ex:
            failures.append(f"{kind} {path}: train.py does not compile: {ex}"[:200])
    assert not failures, "\n".join(failures)


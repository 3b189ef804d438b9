"""Shared test helpers: load example specs, run a captured graph on one device, and check
every sharding candidate of every node against the single-device values, rank by rank."""
from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

import hap.runtime as hr
from hap.capture import capture
from hap.emit import Emitter
from hap.graph import Graph, TensorMeta, decode_arg, resolve_target
from hap.placement import Placement, Splitter
from hap.rules import Candidate, RuleContext, view_units
from hap.rules.token_wise import EXPERTS, ROWS
from hap.solve import all_candidates

# examples/gpt.py with every block weight sharded and all-gathered before its batch-sharded
# linear (FSDP-style)
GPT_GATHERED = {**{f"p_blocks_{b}_{w}_weight": "S(0)" for b in (0, 1) for w in ("qkv", "proj", "fc", "fc_out")},
                "linear": "S(0)", **{f"linear_{i}": "S(0)" for i in range(1, 8)}}

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_example(name: str):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    spec.loader.exec_module(mod)
    return mod


def captured(mod, batch_size: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = mod.model()
    batch = mod.batch(0, batch_size or mod.BATCH_SIZE)
    return model, batch, capture(model, batch)


class GraphValues(dict):
    """Every node's final value, plus what each op read and wrote at the moment it ran: in-place
    ops (T5's ``shifted[..., 1:] = ...``, BatchNorm's counters) change a tensor after it was made."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs_at: dict[str, list] = {}
        self.output_at: dict[str, object] = {}


def _snapshot(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_snapshot(x) for x in v)
    return v


def run_graph(graph: Graph, model: torch.nn.Module, batch) -> GraphValues:
    """Every node's value on one device (a fresh copy of the buffers: batch_norm mutates them)."""
    sd = {k: v.detach().clone() for k, v in model.named_buffers()}  # non-persistent ones too
    sd |= {k: v.detach().clone() for k, v in model.state_dict().items()}
    values = GraphValues()
    for n in graph:
        if n.kind in ("param", "buffer"):
            values[n.name] = sd[n.target]
        elif n.kind == "input":
            values[n.name] = batch[int(n.target)]
        else:
            values.inputs_at[n.name] = [_snapshot(values[i]) for i in n.inputs()]
            values[n.name] = resolve_target(n.target)(*decode_arg(n.args, values),
                                                      **{k: decode_arg(v, values) for k, v in n.kwargs.items()})
            values.output_at[n.name] = _snapshot(values[n.name])
    return values


def local_value(full, p: Placement, splitter: Splitter, rank: int, noise_seed: int = 0):
    if isinstance(full, (list, tuple)):
        return [local_value(f, p, splitter, rank, noise_seed + i) for i, f in enumerate(full)]
    if p.kind == "R" or (p.kind == "S" and p.dim >= full.ndim):
        return full.clone()  # S(d) of a list leaves its elements without dim d replicated
    if p.kind == "S":
        d = p.dim if p.dim >= 0 else p.dim + full.ndim
        ls = splitter.lengths(full.shape[d], p.unit)
        return full.narrow(d, sum(ls[:rank]), ls[rank]).clone()
    # P: random addends that sum to the full value
    n = splitter.num_ranks
    g = torch.Generator().manual_seed(noise_seed)
    noise = [torch.randn(full.shape, generator=g, dtype=full.dtype) for _ in range(n - 1)]
    if rank > 0:
        return noise[rank - 1]
    return full - sum(noise) if noise else full.clone()


def check_candidate(graph: Graph, values: dict, name: str, cand: Candidate, splitter: Splitter,
                    atol: float = 1e-4) -> str | None:
    """Run ``cand`` of node ``name`` on every rank's local inputs; None if it reproduces the
    single-device output in its placement, else a description of the mismatch."""
    node = graph[name]
    n = splitter.num_ranks
    fake_plan = SimpleNamespace(graph=graph, shares=splitter.shares, nodes={}, moves=[], choice=dict)
    em = Emitter(fake_plan)
    refs = [f"in{i}" for i in range(len(node.inputs()))]
    expr = em.expression(node, cand, refs)
    outs = []
    at = getattr(values, "inputs_at", {})
    inputs = at[name] if name in at else [values[ref] for ref in node.inputs()]
    target_full = inputs[1] if len(inputs) > 1 else None
    for r in range(n):
        ns = {"aten": torch.ops.aten, "torch": torch, "RANK": r, "DEVICE": torch.device("cpu"), "hr": hr,
              "layout": SimpleNamespace(random_on_cpu=False)}
        for i, (full_in, p) in enumerate(zip(inputs, cand.inputs)):
            ns[f"in{i}"] = local_value(full_in, p, splitter, r, noise_seed=i)
        for (size, unit), var in em.lengths_used.items():
            ns[var] = splitter.lengths(size, unit)[r]
        ns["LENGTHS"] = {key: splitter.lengths(*key) for key in em.length_keys}
        ns["ROWS"], ns["B"] = splitter.shares, splitter.total
        ns.update({f"rows{f}": tuple(f * x for x in splitter.shares) for f in em.rows_used})

        def class_loss_count(t, w, ii, total=None, _full=target_full):
            keep = _full != ii
            return float(keep.sum()) if w is None else float(w[_full.clamp(min=0)][keep].sum())

        from hap.runtime.sharded_ops import embedding_bag_rows, vocab_embedding
        ns["embedding_bag_rows"] = embedding_bag_rows
        ns["class_loss_count"] = class_loss_count
        ns["vocab_embedding"] = vocab_embedding
        outs.append(eval(expr, ns))
    full = getattr(values, "output_at", {}).get(name, values[name])
    fulls = full if isinstance(full, (list, tuple)) else [full]
    locs = [o if isinstance(o, (list, tuple)) else [o] for o in outs]
    for k, f in enumerate(fulls):
        if not isinstance(f, torch.Tensor):
            continue
        p = cand.output
        if p.kind == "P" and not f.is_floating_point() and isinstance(full, (list, tuple)):
            p = Placement("R")  # integer side outputs of a P list (embedding_bag's) are whole on every rank
        if p.kind == "P":
            got = sum(loc[k] for loc in locs)
            want = f
            if not torch.allclose(got.double(), want.double(), atol=atol, rtol=1e-4):
                return f"{name} {cand}: P sum differs by {(got.double() - want.double()).abs().max():.3g}"
            continue
        for r in range(n):
            want = local_value(f, p, splitter, r)
            got = locs[r][k]
            if tuple(got.shape) != tuple(want.shape):
                return f"{name} {cand}: rank {r} local shape {tuple(got.shape)} != {tuple(want.shape)} ({expr})"
            if f.is_floating_point() and not torch.allclose(got, want, atol=atol, rtol=1e-4):
                return f"{name} {cand}: rank {r} differs by {(got - want).abs().max():.3g}"
            if not f.is_floating_point() and not torch.equal(got, want):
                return f"{name} {cand}: rank {r} integer values differ"
    return None


def _all_float(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_all_float(x) for x in v)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def check_all_candidates(graph: Graph, values: dict, shares: tuple[int, ...]) -> tuple[int, list[str]]:
    splitter = Splitter(shares)
    ctx = RuleContext(graph, splitter, view_units(graph))
    cands = all_candidates(graph, ctx)
    errors, checked = [], 0
    for node in graph.ops():
        for c in cands[node.name]:
            if c.emit == "sync_batch_norm":
                continue  # needs real collectives: covered by tests/test_runtime.py and the e2e tests
            if c.name in (ROWS, EXPERTS):
                continue  # a token-wise call is exact as a whole, not op by op: tests/e2e/test_models_exact.py
            if any(p.kind == "P" and not _all_float(values[r]) for r, p in zip(node.inputs(), c.inputs)):
                continue  # partial sums of integer tensors never arise from differentiable code
            checked += 1
            err = check_candidate(graph, values, node.name, c, splitter)
            if err:
                errors.append(err)
    return checked, errors


__all__ = ["TensorMeta", "captured", "check_all_candidates", "load_example", "run_graph"]


def emitted_layout(text: str):
    """The layout an emitted train.py builds (its module run as an import: main does not start)."""
    ns: dict = {"__name__": "emitted_train"}
    exec(compile(text, "train.py", "exec"), ns)
    return ns["LAYOUT"]

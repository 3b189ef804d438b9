"""Plans for people: rich tables of ranks, strategy per layer, baselines."""
from __future__ import annotations

import io
from collections import OrderedDict
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # a report reads a Plan; Plan.summary() renders with this module
    from hap.plan import Plan


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def _gb(b: float) -> str:
    return f"{b / 2**30:.2f}"


def ranks_table(plan: Plan) -> Table:
    c = plan.cluster
    links = ""
    if c.num_nodes > 1:
        links = f"; inter-node {c.inter_node.bytes_per_s * 8 / 1e9:.3g} Gbit/s" + \
            (f", {c.links}" if c.links != "typed" else "")
    elif c.intra_node_measured:
        links = f"; links {c.links}"
    t = Table(title=f"{plan.graph.model_name} on {c.name}: {plan.num_ranks} ranks, "
                    f"global batch {plan.global_batch}{links}")
    for col in ("rank", "device", "node", "batch share", "compute ms", "comm ms", "memory GiB", "capacity GiB"):
        t.add_column(col, justify="right" if col not in ("device",) else "left")
    comm = plan.predicted.exposed_comm_s
    for r in range(plan.num_ranks):
        info = plan.cluster.ranks[r]
        dev = info.device + (f" (x{info.slowdown:g} slower)" if info.slowdown != 1 else "")
        share = str(plan.shares[r])
        if plan.micro_batches and plan.micro_batches[r] > 1:  # micro-batches to fit memory
            share += f" in {plan.micro_batches[r]} micro-batches"
        if plan.recompute_counts:  # ranks recompute different numbers of blocks
            share += f", {plan.recomputed_blocks(r)} blocks recomputed"
        t.add_row(str(r), dev, str(info.node), share, _ms(plan.predicted.compute_s[r]), _ms(comm),
                  _gb(plan.predicted.memory_bytes[r]), _gb(plan.cluster.memory_bytes(r)))
    return t


def strategy_table(plan: Plan, max_rows: int = 40) -> Table:
    t = Table(title="strategy per layer (parameters and compute ops)")
    for col in ("module", "op", "placements", "source"):
        t.add_column(col)
    rows: OrderedDict[tuple, list] = OrderedDict()
    blocks = plan.graph.blocks() if plan.recompute else {}
    recomputed = {name for b in plan.recompute for name in blocks[b]}
    shown: set[str] = set()
    for n in plan.graph.ops():  # each parameter's row comes just before the first op that reads it
        for ref in n.inputs():
            p = plan.graph[ref]
            if p.kind == "param" and ref not in shown:
                shown.add(ref)
                key = (p.target.rsplit(".", 1)[0], "param " + p.target.rsplit(".", 1)[-1], plan.nodes[ref].output, "")
                rows.setdefault(key, []).append(ref)
        info = plan.nodes[n.name]
        if n.op_class in ("matmul", "conv", "attention", "norm") or "loss" in n.target or n.name == plan.graph.loss:
            ins = ",".join(str(p) for p in info.candidate.inputs)
            mod = (n.module.split(" ")[0] or "-") + (" (recomputed)" if n.name in recomputed else "")
            key = (mod, n.target.replace("aten.", "").rsplit(".", 1)[0], f"{ins} -> {info.output}",
                   n.source.split("  ")[0])
            rows.setdefault(key, []).append(n.name)
    for i, ((mod, op, pl, src), names) in enumerate(rows.items()):
        if i >= max_rows:
            t.add_row("...", f"{len(rows) - max_rows} more rows", "", "")
            break
        t.add_row(mod, op + (f" x{len(names)}" if len(names) > 1 else ""), pl, src)
    return t


def stages_table(plan: Plan) -> Table:
    """A pipelined plan's stages: which ranks run which blocks, in how many micro-batches, and
    what each hands the next stage."""
    # a plan file may leave its schedule out (Plan.from_json): the stages are still shown
    shown = plan.schedule.summary(len(plan.stages)) if plan.schedule else f"{len(plan.stages)} stages"
    t = Table(title=f"pipeline stages: {shown}")
    for col in ("stage", "ranks", "blocks", "shares", "stage plan ms", "sends per sample"):
        t.add_column(col, justify="left" if col in ("ranks", "blocks") else "right")
    for i, st in enumerate(plan.stages):
        g = st.plan.graph
        per_sample = sum(g[x].out.nbytes for x in st.sends) / max(1, plan.global_batch)
        blocks = st.blocks[0] if len(st.blocks) == 1 else f"{st.blocks[0]}..{st.blocks[-1]} ({len(st.blocks)})"
        t.add_row(str(i), _short(st.ranks), blocks, _short(st.plan.shares), _ms(st.plan.predicted_step_s),
                  f"{per_sample / 1024:.1f} KiB" if st.sends else "-")
    return t


def baselines_table(plan: Plan) -> Table:
    t = Table(title="predicted step time (same cost model)")
    for col in ("strategy", "step ms", "hap speed-up", "shares"):
        t.add_column(col, justify="right" if col != "strategy" else "left")
    hap = plan.predicted_step_s
    t.add_row(f"hap ({plan.strategy})", _ms(hap), "1.00x", _short(plan.shares))
    for k, v in plan.baselines.items():
        if not v.feasible:
            t.add_row(k, "does not fit", "", "")
            continue
        t.add_row(k, _ms(v.predicted_step_s), f"{v.predicted_step_s / hap:.2f}x", _short(v.shares))
    t.add_row("lower bound", _ms(plan.lower_bound_step_s), f"{plan.lower_bound_step_s / hap:.2f}x", "")
    return t


def _short(xs) -> str:
    xs = list(xs)
    s = ", ".join(map(str, xs[:8]))
    return s + (f", ... ({len(xs)} ranks)" if len(xs) > 8 else "")


def render(plan: Plan, console: Console) -> None:
    console.print(ranks_table(plan))
    if plan.pipelined:
        console.print(stages_table(plan))
    console.print(strategy_table(plan))
    console.print(baselines_table(plan))
    p = plan.predicted
    ph = p.phases()
    if plan.pipelined:
        console.print(f"predicted step {_ms(p.step_s)} ms in {plan.precision}: the stages' schedule (each "
                      "stage's forward and backward per micro-batch, the cuts' transfers), then the slowest "
                      f"stage's gradient all-reduce and optimizer step; solver: {plan.solver_status} in "
                      f"{plan.solve_s:.2f} s")
    else:
        console.print(f"predicted step {_ms(p.step_s)} ms in {plan.precision} (gradients all-reduced in "
                      f"{plan.graph.grad_reduce}) = compute {_ms(ph['compute'])} + resharding "
                      f"{_ms(p.comm_s)} + gradient all-reduce {_ms(p.grad_sync_s)}"
                      f"{' (partly during backward)' if p.grad_overlap and len(p.grad_buckets) > 1 else ''} + "
                      "optimizer "
                      f"{_ms(ph['optimizer'])} + batch {_ms(ph['data_wait'])}; solver: {plan.solver_status} in "
                      f"{plan.solve_s:.2f} s")
    for note in plan.notes:
        console.print(f"note: {note}")
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}")


def plan_text(plan: Plan) -> str:
    buf = io.StringIO()
    render(plan, Console(file=buf, width=140, force_terminal=False))
    return buf.getvalue()

"""The arithmetic of pipeline stages across node kinds, before they are built (issue 29, item 5).

    python benchmarks/pipeline_arithmetic.py [--case paper-8|paper-64|gpt2-512|emulated-2|llama-8b]
                                             [--precision fp32|auto]
                                             [--out table.md]

For one model and cluster it prices, on hap's own cost model, what a pipeline of contiguous node
groups would cost against the single-stage plans hap makes today, to first order:

- compute: every op's whole-batch work on each device (``CostModel.whole_s``), summed per block;
  a stage of nodes computes its blocks at the sum of its ranks' rates (its samples split by speed);
- the cut: the activations a block hands on (the tensors read after it) cross from the sending
  stage's nodes to the receiving stage's forward, and their gradient back, through the smaller
  side's node links (``Cluster.group_link``: every rank of a node shares the node's link);
- each stage's gradient all-reduce over its own ranks' link (inside one node, or across the
  stage's nodes), after the last micro-batch's backward;
- a tied weight read in two stages (GPT's embedding and head) is all-reduced between them too;
- the schedule: 1F1B over ``m`` micro-batches, ``sum_i t_i/m + (m - 1) max_i t_i/m`` where t_i
  is stage i's compute plus what its cut transfers outlast it.

Layers go to stages by a dynamic program over block cuts that minimises the slowest stage;
the nodes keep Metis's order (the faster kind first) and every split of them into contiguous
groups is priced, each with 1..32 micro-batches; the table shows the fastest per number of
stages. Memory is not checked here. The
table's ``single stage`` row is hap's plan today (``hap-plan``'s prediction); ``dp_proportional``
is the data-parallel baseline hap prints.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table

GPT2 = {"HAP_GPT_LAYERS": "12", "HAP_GPT_DIM": "768", "HAP_GPT_HEADS": "12", "HAP_GPT_VOCAB": "50257",
        "HAP_GPT_SEQ": "256"}
GPT8 = {"HAP_GPT_LAYERS": "8", "HAP_GPT_DIM": "1024", "HAP_GPT_HEADS": "16", "HAP_GPT_VOCAB": "8192",
        "HAP_GPT_SEQ": "64"}
# the emulated cluster issue 29 measures on: two machines of two CPU ranks, the second's 2x
# slower, 1 Gbit/s between them
EMULATED_2 = ('name = "emulated-2"\n[network]\ninter_node_gbps = 1.0\n'
              '[[nodes]]\ndevice = "cpu"\ncount = 2\n[[nodes]]\ndevice = "cpu"\ncount = 2\nslowdown = 2.0\n')
CASES = {  # spec, cluster (a file in profiles/clusters, or a cluster file's text), environment, samples per GPU
    "paper-8": ("examples/gpt.py", "hap-paper", GPT2, 8),
    "paper-64": ("examples/gpt.py", "hap-paper", GPT2, 64),
    "gpt2-512": ("examples/gpt.py", "a100-v100-32x32", GPT2, 8),
    "emulated-2": ("examples/gpt.py", EMULATED_2, GPT8, 2),
    "llama-8b": ("examples/hf_usage.py", "a100-v100-4x4", {"HAP_HF_MODEL": "llama", "HAP_HF_SIZE": "8b"}, 4),
}
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
MAX_STAGES = 8  # node groups of a pipeline, at most


def block_table(graph, cm):
    """Per unit of the pipeline (the prologue, each block, the epilogue): its nodes, its
    whole-batch compute per rank, the parameter bytes it reads, and the bytes of what it hands on."""
    from hap.graph import TensorMeta

    blocks = graph.blocks()
    order = [n.name for n in graph]
    where = {}
    for b, names in blocks.items():
        for x in names:
            where[x] = b
    first = min(order.index(names[0]) for names in blocks.values())
    units, current = [], None
    for i, name in enumerate(order):
        label = where.get(name, "prologue" if i < first else "epilogue")
        if label != current:
            units.append((label, []))
            current = label
        units[-1][1].append(name)
    users = graph.users()
    rows = []
    seen_params: dict[str, str] = {}
    for label, names in units:
        inside = set(names)
        work = [0.0] * cm.n
        params = set()
        for x in names:
            node = graph[x]
            if node.kind == "op" and node.op_class != "view":
                for r in range(cm.n):
                    work[r] += cm.whole_s(node, r)
            for ref in node.inputs():
                if graph[ref].kind == "param":
                    params.add(ref)
        handed = sum(graph[x].meta.nbytes for x in names if isinstance(graph[x].meta, TensorMeta)
                     and any(u not in inside for u in users[x]) and graph[x].follows_batch)
        shared = {p for p in params if p in seen_params}
        for p in params:
            seen_params.setdefault(p, label)
        rows.append({"label": label, "work": work, "params": params, "shared": shared, "handed": handed})
    return rows


def param_bytes(graph, names) -> float:
    return float(sum(graph[p].meta.nbytes for p in names))


def best_split(costs: list[list[float]], k: int) -> tuple[float, list[int]]:
    """Contiguous split of len(costs[0]) units into k stages minimising the slowest stage, where
    ``costs[s][u]`` is unit u's seconds on stage s; (slowest, first unit of each stage)."""
    n = len(costs[0])
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n + 1):
            run = 0.0
            for i in range(j - 1, s - 2, -1):
                run += costs[s - 1][i]
                v = max(best[s - 1][i], run)
                if v < best[s][j]:
                    best[s][j], back[s][j] = v, i
    starts, j = [], n
    for s in range(k, 0, -1):
        i = back[s][j]
        starts.append(i)
        j = i
    return best[k][n], starts[::-1]


def price_pipeline(graph, cluster, cm, units, groups, micro: int, nic: str = "per-node") -> dict:
    """One pipeline: ``groups`` are the stages' node lists, in pipeline order. ``nic``: whether
    a node's ranks share its one network link (hap's model, ``Cluster.group_link``) or each
    rank has its own (a what-if: then a cut's rows cross in parallel, one lane per rank)."""
    from hap.machine import collective_s

    nodes = cluster.nodes()
    stage_ranks = [[r for i in g for r in nodes[i]] for g in groups]
    rates = []  # per stage, per unit: seconds of the unit's whole-batch work at the stage's ranks' summed rate
    for ranks in stage_ranks:
        rates.append([1.0 / sum(1.0 / u["work"][r] for r in ranks if u["work"][r] > 0)
                      if any(u["work"][r] > 0 for r in ranks) else 0.0 for u in units])
    slowest, starts = best_split(rates, len(groups))
    bounds = starts + [len(units)]
    link = cluster.inter_node.bytes_per_s
    stages = []
    for s, ranks in enumerate(stage_ranks):
        mine = units[bounds[s]:bounds[s + 1]]
        compute = sum(rates[s][bounds[s]:bounds[s + 1]])
        params = set().union(*(u["params"] for u in mine)) if mine else set()
        grads = param_bytes(graph, params) * cm.grad_wire
        allreduce = collective_s("all_reduce", grads, (1 / len(ranks),) * len(ranks), cluster.group_link(ranks), "")
        cut = 0.0
        if s + 1 < len(groups) and mine:
            handed = mine[-1]["handed"]  # activations forward and their gradient back, per step
            lanes = min(len(stage_ranks[s]), len(stage_ranks[s + 1])) if nic == "per-rank" else \
                min(len(groups[s]), len(groups[s + 1]))
            cut = 2 * handed / (lanes * link)
        stages.append({"ranks": ranks, "units": [u["label"] for u in mine], "compute": compute, "cut": cut,
                       "allreduce": allreduce, "params": params})
    tied = 0.0
    for a, b in itertools.combinations(range(len(stages)), 2):
        both = stages[a]["params"] & stages[b]["params"]
        if both:
            ranks = stages[a]["ranks"] + stages[b]["ranks"]
            tied += collective_s("all_reduce", param_bytes(graph, both) * cm.grad_wire, (1 / len(ranks),) * len(ranks),
                                 cluster.group_link(ranks), "")
    per_micro = [max(st["compute"], st["cut"]) / micro for st in stages]
    step = sum(per_micro) + (micro - 1) * max(per_micro) + max(st["allreduce"] for st in stages) + tied
    bubble = 1 - sum(st["compute"] for st in stages) / (len(stages) * step) if stages else 0.0
    return {"step": step, "stages": stages, "tied": tied, "micro": micro, "bubble": bubble}


def _span(xs) -> str:
    return str(xs[0]) if len(xs) == 1 else f"{xs[0]}..{xs[-1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="paper-8", choices=sorted(CASES))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "auto"], help="as hap-plan's")
    ap.add_argument("--nic", default="per-node", choices=["per-node", "per-rank"],
                    help="per-node: a node's ranks share its link (hap's model); per-rank: a what-if for cuts")
    ap.add_argument("--out", help="also write the table here (markdown)")
    args = ap.parse_args()
    spec, cluster_name, env, per_gpu = CASES[args.case]
    from hap.cluster import load_cluster

    if "\n" in cluster_name:  # a cluster file's text
        import tempfile

        path = Path(tempfile.mkdtemp()) / "cluster.toml"
        path.write_text(cluster_name)
        cluster_name = cluster_name.split('"')[1]
    else:
        path = ROOT / "profiles/clusters" / f"{cluster_name}.toml"
    cluster = load_cluster(path)
    os.environ.update(env, HAP_GPT_BATCH=str(per_gpu * cluster.num_ranks), HAP_BATCH=str(per_gpu * cluster.num_ranks))
    from hap.api import plan_spec
    from hap.cost import CostSetup
    from hap.precision import choose, training_graph
    from hap.search import shares_by
    from hap.spec import capture_spec, load_spec

    precision, _ = choose(cluster, args.precision)
    graph = training_graph(capture_spec(load_spec(str(ROOT / spec)), None), precision, "fp32")
    plan = plan_spec(str(ROOT / spec), cluster, precision=args.precision,
                     optimizer="adamw" if "HAP_HF_MODEL" in env else "sgd")
    total = graph.global_batch() or per_gpu * cluster.num_ranks
    cm = CostSetup(shares_by("speed", cluster, total, precision)).cost_model(graph, cluster)
    units = block_table(graph, cm)
    kinds = {}
    for i, ranks in enumerate(cluster.nodes()):
        kinds.setdefault(cluster.ranks[ranks[0]].device, []).append(i)
    # Metis's order: the faster kind first (its rate per rank)
    order = [i for dev in sorted(kinds, key=lambda d: -cluster.speed(cluster.nodes()[kinds[d][0]][0]))
             for i in kinds[dev]]
    rows = [["single stage (hap today)", "all", "", "", f"{plan.predicted_step_s * 1e3:.0f}", "", "", "", "1.00x"]]
    dp = plan.baselines.get("dp_proportional")
    if dp is not None and dp.predicted_step_s is not None:
        rows.append(["dp_proportional", "all", "", "", f"{dp.predicted_step_s * 1e3:.0f}", "", "", "",
                     f"{plan.predicted_step_s / dp.predicted_step_s:.2f}x"])
    best: dict[int, dict] = {}  # stages -> the fastest layout priced
    step = -(-len(order) // MAX_STAGES)  # on many nodes, stages begin at every step-th node
    slots = [order[i:i + step] for i in range(0, len(order), step)]
    for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, len(slots)), c)
                                              for c in range(min(len(slots), MAX_STAGES))):
        bounds = (0, *cuts, len(slots))
        groups = [[i for slot in slots[a:b] for i in slot] for a, b in zip(bounds, bounds[1:])]
        if len(units) < len(groups):
            continue
        for m in MICRO_BATCHES:
            if m <= total:
                got = price_pipeline(graph, cluster, cm, units, groups, m, args.nic)
                got["groups"] = groups
                if len(groups) not in best or got["step"] < best[len(groups)]["step"]:
                    best[len(groups)] = got
    for k, got in sorted(best.items()):
        st = got["stages"]
        rows.append([f"{k} stage" + ("s" if k > 1 else ""), "; ".join(_span(g) for g in got["groups"]),
                     "; ".join(_span(x["units"]) if x["units"] else "-" for x in st), str(got["micro"]),
                     f"{got['step'] * 1e3:.0f}", f"{max(x['compute'] for x in st) * 1e3:.0f}",
                     f"{max(x['cut'] for x in st) * 1e3:.0f}",
                     f"{max(x['allreduce'] for x in st) * 1e3:.0f} + {got['tied'] * 1e3:.0f}",
                     f"{plan.predicted_step_s / got['step']:.2f}x"])
    print(f"{args.case}: {spec} on {cluster_name}, {total} samples in {precision}, links {args.nic}, "
          f"bound {plan.lower_bound_step_s * 1e3:.0f} ms")
    head = ["plan", "nodes per stage", "units per stage", "micro-batches", "step ms", "slowest stage ms",
            "largest cut ms", "all-reduce ms (stage + tied)", "vs hap today"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    print_table(lines, args.out)


if __name__ == "__main__":
    main()

"""``hap-plan SPEC [--cluster FILE] [--json] [--emit DIR [--force] [--run]]``.

Plans the model of a spec file for a cluster and shows the plan (a table, or one JSON
object with ``--json``); ``--emit`` writes ``train.py`` + ``plan.json``; ``--run`` then
runs the emitted program under torchrun on this machine. User mistakes exit 2 with a
message and no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

from hap.errors import HapError, PinError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="hap-plan", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="model spec file (defines model(), batch(step, batch_size), BATCH_SIZE)")
    ap.add_argument("--cluster", default=None, help="cluster TOML (default: the embedded 2-rank emulated CPU cluster)")
    ap.add_argument("--json", action="store_true", help="print exactly one JSON object")
    ap.add_argument("--emit", metavar="DIR", default=None, help="write DIR/train.py and DIR/plan.json")
    ap.add_argument("--force", action="store_true", help="with --emit: overwrite a non-empty DIR")
    ap.add_argument("--run", action="store_true", help="after --emit, run the program under torchrun here")
    ap.add_argument("--steps", type=int, default=10, help="with --run: training steps (default 10)")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default: the spec's BATCH_SIZE)")
    ap.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd",
                    help="the optimizer whose state the plan's memory counts; train.py's default --optimizer")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default="fp32",
                    help="compute dtype: fp32 (default, exactly what fp32 trains), bf16 or fp16 autocast with fp32 "
                         "master weights (fp16 with loss scaling), or auto: the fastest every device runs at speed")
    ap.add_argument("--grad-reduce", choices=["fp32", "bf16"], default="fp32",
                    help="dtype of the gradient all-reduce: fp32 (default) or bf16 (half the bytes; each rank's "
                         "gradient rounded to bf16 before the sum, see docs/precision.md)")
    ap.add_argument("--recompute", choices=["auto", "all", "none"], default="auto",
                    help="activation checkpointing of the model's repeated blocks: auto (default: the fewest blocks "
                         "that let activations fit, only where memory is tight), all, or none")
    ap.add_argument("--experts", choices=["auto", "shard", "whole"], default="auto",
                    help="the experts of mixture-of-experts layers (transformers' experts modules): auto (default: "
                         "sharded over the ranks where that is faster), shard (expert parallelism), or whole on every "
                         "rank, each running them on its own tokens")
    ap.add_argument("--timeline", metavar="PNG", default=None,
                    help="draw the per-rank timeline of the plan and of dp_even to PNG (a pipelined plan: "
                         "its schedule, one row per stage)")
    ap.add_argument("--compare", action="store_true",
                    help="also predict the fsdp_even and megatron_tp_even baselines")
    ap.add_argument("--coverage", action="store_true",
                    help="list the captured ATen ops, which have sharding rules, which ran replicated")
    ap.add_argument("--strict", action="store_true", help="fail on ops without a sharding rule")
    ap.add_argument("--pin", action="append", default=[], metavar="NODE=PLACEMENT",
                    help="fix a node's placement, e.g. --pin p_fc_weight=S(0) (repeatable)")
    ap.add_argument("--stages", default="auto", metavar="auto|N",
                    help="pipeline stages: auto (tried where the network binds), 1 (none) or a count (default auto)")
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds per MILP solve (default 20)")
    ap.add_argument("--verbose", "-v", action="store_true",
                    help="log the planner's steps and what the solver printed (to stderr)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=140)
    out = Console() if sys.stdout.isatty() else Console(width=140)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    with _verbose_log(args.verbose):
        return _run(args, out, err)


@contextlib.contextmanager
def _verbose_log(verbose: bool) -> Iterator[None]:
    """With --verbose, the planner's log (what solvers printed included) goes to stderr."""
    if not verbose:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    hap_log = logging.getLogger("hap")
    level, propagate = hap_log.level, hap_log.propagate
    hap_log.setLevel(logging.INFO)
    hap_log.addHandler(handler)
    hap_log.propagate = False
    try:
        yield
    finally:
        hap_log.removeHandler(handler)
        hap_log.setLevel(level)
        hap_log.propagate = propagate


def _run(args: argparse.Namespace, out: Console, err: Console) -> int:
    try:
        return _main(args, out, err)
    except HapError as e:
        print(f"hap-plan: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        err.print("hap-plan: interrupted")
        return 130


def _main(args: argparse.Namespace, out: Console, err: Console) -> int:
    from hap.api import plan_graph
    from hap.calibrate import resolve
    from hap.cluster import load_cluster
    from hap.emit import check_emit_dir
    from hap.spec import capture_spec, load_spec

    if args.emit:
        check_emit_dir(Path(args.emit), args.force)
    if args.run and not args.emit:
        raise HapError("--run needs --emit DIR (the program it runs)")
    pins = _pins(args.pin)  # a mistyped pin stops before the model is captured
    cluster = load_cluster(args.cluster)
    mod = load_spec(args.spec)
    with err.status("capturing the model with torch.export") as status:
        cluster = resolve(cluster, lambda msg: status.update(msg))  # device "cpu": this machine
        status.update("capturing the model with torch.export")
        graph = capture_spec(mod, args.batch_size)
        status.update(f"planning {len(graph)} nodes for {cluster.num_ranks} ranks")
        plan = plan_graph(graph, cluster, optimizer=args.optimizer, precision=args.precision,
                          grad_reduce=args.grad_reduce, strict=args.strict, recompute=args.recompute,
                          experts=args.experts, time_limit_s=args.time_limit, spec=str(Path(args.spec).resolve()),
                          pins=pins, stages=args.stages, progress=lambda msg: status.update(msg))
    if args.compare:
        from hap.baselines import compare

        with err.status("solving the compared baselines"):
            plan = compare(plan, cluster, optimizer=args.optimizer, time_limit_s=args.time_limit)
    if args.timeline and plan.pipelined:
        from hap.timeline import draw_pipeline

        draw_pipeline(plan, args.timeline)
    elif args.timeline:
        from hap.simulate import simulate, timeline_for_baseline
        from hap.timeline import draw

        draw({"hap": simulate(plan), "dp_even": timeline_for_baseline(plan, "dp_even")}, args.timeline)
    if args.emit:
        from hap.emit import emit_program

        emit_program(plan, Path(args.emit), spec=args.spec, force=args.force)
    if args.json:
        d = plan.to_json()
        d.pop("graph")
        if args.coverage:
            from hap.coverage import coverage

            d["coverage"] = coverage(plan)
        print(json.dumps(d))
    else:
        from hap.report import render

        render(plan, out)
        if args.coverage:
            from hap.coverage import coverage_table

            out.print(coverage_table(plan))
        if args.timeline:
            out.print(f"wrote the timeline to {args.timeline}")
        if args.emit:
            out.print(f"wrote {args.emit}/train.py and {args.emit}/plan.json")
    if args.run:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.num_ranks}",
               str(Path(args.emit) / "train.py"), "--steps", str(args.steps), "--emulate"]
        out.print(f"running: {' '.join(cmd)}")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        return subprocess.call(cmd, env=env)
    return 0


def _pins(items: list[str]) -> dict[str, str]:
    """The --pin NODE=PLACEMENT arguments as a dict; PinError names one written otherwise."""
    from hap.api import PIN_SYNTAX, check_pins

    pins: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise PinError(f"--pin {item}: no '=' between node and placement; {PIN_SYNTAX}")
        name, text = (s.strip() for s in item.split("=", 1))
        if name in pins:
            raise PinError(f"--pin {item}: {name} is pinned twice (also to {pins[name]}); pin each node once")
        pins[name] = text
    return check_pins(pins)


if __name__ == "__main__":
    sys.exit(main())

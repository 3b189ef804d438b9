"""One cell's preparation, run in a process of its own so that the cell's environment (a spec's
``HAP_*`` sizes) holds from the spec's import on: hap's plan and each hap baseline emitted, the
shares of the torch baselines, and the single-device reference run.

    python -m hap.bench.prepare --spec S --cluster C --precision P --strategies hap,hap:fsdp_even,... \\
        --out DIR --exact-steps 3 --lr 1e-3

``hap:NAME`` is hap's baseline NAME (``hap.baselines``), or ``hap:1_stage``: hap's best plan of
one stage (the plan itself where it has no pipeline stages).

Writes ``DIR/<strategy>/train.py`` for each hap strategy, ``DIR/prepared.json`` (the global batch,
even and speed-proportional shares, and per hap strategy its plan's name, shares and predicted
step) and ``DIR/reference.pt`` (the reference's losses and final state).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hap.bench.prepare")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--strategies", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--exact-steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    from hap.api import plan_spec
    from hap.baselines import baseline
    from hap.bench.reference import reference
    from hap.emit import emit_program
    from hap.errors import HapError
    from hap.search import shares_by

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_spec(args.spec, args.cluster, precision=args.precision)
    gb = plan.global_batch
    done: dict = {"global_batch": gb, "even": list(shares_by("even", plan.cluster, gb)),
                  "proportional": list(shares_by("speed", plan.cluster, gb, args.precision)), "hap": {}}
    for strategy in args.strategies.split(","):
        if not strategy.startswith("hap"):
            continue
        name = strategy.split(":", 1)[1] if ":" in strategy else None
        try:
            if name == "1_stage":  # hap's best plan without pipeline stages
                chosen = plan if not plan.pipelined else plan_spec(args.spec, args.cluster, precision=args.precision,
                                                                   stages=1)
            else:
                chosen = plan if name is None else baseline(name, plan.graph, plan.cluster, spec=plan.spec)
        except HapError as e:
            done["hap"][strategy] = {"skipped": f"{name}: {e}"}
            continue
        if chosen is None:
            done["hap"][strategy] = {"skipped": f"{name} does not apply to this model"}
            continue
        emit_program(chosen, out / strategy.replace(":", "-"), spec=args.spec, force=True)
        done["hap"][strategy] = {"plan": chosen.strategy, "shares": list(chosen.shares),
                                 "predicted_s": chosen.predicted_step_s, "phases_s": chosen.predicted.phases()}
        if chosen.pipelined:  # which pipeline ran: its stages, schedule, micro-batches and predicted bubble
            done["hap"][strategy]["pipeline"] = chosen.schedule.summary(len(chosen.stages))
    losses, state = reference(args.spec, args.exact_steps, args.lr, gb, args.precision)
    torch.save({"losses": losses, "state": state}, out / "reference.pt")
    (out / "prepared.json").write_text(json.dumps(done, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

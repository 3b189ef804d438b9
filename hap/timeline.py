"""Draw timelines: one row per rank, compute / communication / idle, several plans stacked
on one time axis (the plan above its baselines); a pipelined plan's schedule, one row per
stage; a run's measured steps. With matplotlib's Agg backend."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hap.plan import Plan
    from hap.simulate import Timeline

COLORS = {"compute": "#2e7d32", "backward": "#66bb6a", "step": "#6a1b9a", "comm": "#ef6c00", "sync": "#c62828",
          "idle": "#e0e0e0"}
MAX_RANK_ROWS = 16  # larger clusters: the first and last ranks of each device kind, with a note


def _rows(tl: Timeline) -> list[int]:
    if tl.num_ranks <= MAX_RANK_ROWS:
        return list(range(tl.num_ranks))
    keep: list[int] = []
    last = None
    for r, label in enumerate(tl.rank_labels):
        if label != last:
            keep.append(r)
            if r > 0 and r - 1 not in keep:
                keep.append(r - 1)
            last = label
    keep.append(tl.num_ranks - 1)
    return sorted(set(keep))[:MAX_RANK_ROWS]


def draw(timelines: dict[str, Timeline], path: str | Path, title: str | None = None) -> Path:
    """Write a PNG (or any format matplotlib infers from ``path``) of ``timelines``, stacked.

    ``timelines`` maps a label ("hap", "dp_even") to a ``hap.simulate.Timeline``; every
    rank is one row, every segment a bar coloured by what the rank does in it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not timelines:
        raise ValueError("draw() needs at least one timeline")
    rows = {k: _rows(tl) for k, tl in timelines.items()}
    total_rows = sum(len(r) for r in rows.values()) + len(timelines) - 1
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.32 * total_rows))
    scale, unit = (1e3, "ms")
    horizon = max(tl.step_s for tl in timelines.values()) or 1.0
    if horizon * scale < 1:
        scale, unit = 1e6, "µs"
    y = 0
    ticks, ticklabels = [], []
    for key, tl in timelines.items():
        for r in rows[key]:
            ticks.append(y)
            ticklabels.append(f"{key} r{r} {tl.rank_labels[r]}")
            for s in tl.segments:
                x0, w = s.start_s * scale, s.duration_s * scale
                if w <= 0:
                    continue
                if s.kind == "comm":
                    ax.barh(y, w, left=x0, color=COLORS["sync" if s.phase == "sync" else "comm"], height=0.8,
                            linewidth=0)
                    continue
                busy = s.compute_s[r] * scale
                color = COLORS[{"forward": "compute", "step": "step"}.get(s.phase, "backward")]
                ax.barh(y, busy, left=x0, color=color, height=0.8, linewidth=0)
                if w - busy > 0:
                    ax.barh(y, w - busy, left=x0 + busy, color=COLORS["idle"], height=0.8, linewidth=0)
            y += 1
        ax.axvline(tl.step_s * scale, color="black", linewidth=0.6, linestyle=":")
        y += 1
    ax.set_yticks(ticks)
    ax.set_yticklabels(ticklabels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"time in one training step ({unit})")
    ax.set_xlim(0, horizon * scale * 1.02)
    steps = ", ".join(f"{k} {tl.step_s * 1e3:.3g} ms" for k, tl in timelines.items())
    first = next(iter(timelines.values()))
    ax.set_title(title or f"predicted step: {steps}  ({first.mode} timeline)", fontsize=9)
    height = 1.6 + 0.32 * total_rows
    fig.set_size_inches(12, height)
    return _finish(fig, path, height, 0.3, [
        ("compute", "forward compute"), ("backward", "backward compute"), ("comm", "collective (resharding)"),
        ("sync", "gradient all-reduce"), ("step", "optimizer step"), ("idle", "idle (waiting for the slowest rank)")])


def _finish(fig, path: str | Path, height: float, legend_in: float, legend: list[tuple[str, str]]) -> Path:
    """A plan's picture: the legend (colour name, label) along the bottom, saved to ``path``."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=COLORS[c], label=label) for c, label in legend],
               loc="lower center", ncol=len(legend), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def draw_pipeline(plan: Plan, path: str | Path) -> Path:
    """A pipelined plan's step as the planner priced it (``Plan.schedule``): one row per stage,
    each micro-batch's ``F`` (forward) and ``B`` (backward; the last stage's forward and
    backward) numbered, in the plan's order (1F1B or GPipe), each cut's transfers below the
    bar of the stage that sends, then each stage's gradient all-reduce and optimizer step and,
    on the stages that hold tied weights, those weights' all-reduce; the grey is the bubble.
    Dashed: the best single-stage plan's predicted step, for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hap.cluster import ranks_text
    from hap.pipeline import blocks_text, schedule_s

    sch = plan.schedule
    if sch is None or not plan.pipelined:
        raise ValueError("draw_pipeline draws a pipelined plan (hap-plan --stages 2 or more)")
    events: list[tuple[int, str, int, float, float]] = []
    sends: list[tuple[int, str, int, float, float]] = []
    ends = schedule_s(sch.forward_s, sch.backward_s, sch.cut_s, sch.micro_batches, events, sch.name, sends, sch.warmup)
    k, ms = len(plan.stages), 1e3
    step = sch.step_s(ends)
    tied_at = sch.tied_start_s(ends)  # the shared weights' all-reduce starts
    single = plan.baselines.get("hap_1_stage")
    horizon = max(step, single.predicted_step_s if single and single.feasible else 0.0)
    fig, ax = plt.subplots(figsize=(12, 1.9 + 0.55 * k))
    for s in range(k):
        ax.barh(s, step * ms, color=COLORS["idle"], height=0.8, linewidth=0)
    for s, kind, j, t0, t1 in events:
        ax.barh(s, (t1 - t0) * ms, left=t0 * ms, color=COLORS["compute" if kind == "F" else "backward"], height=0.8,
                edgecolor="white", linewidth=0.4)
        if (t1 - t0) / horizon > 0.012 * (len(str(j)) + 1):
            ax.text((t0 + t1) / 2 * ms, s, f"{kind}{j}", ha="center", va="center", fontsize=6, color="white")
    for s, _, _, t0, t1 in sends:  # activations on and their gradients back, as the sender's links carry them
        ax.barh(s + 0.3, (t1 - t0) * ms, left=t0 * ms, color=COLORS["comm"], height=0.2, linewidth=0)
    for s, (e, a) in enumerate(zip(ends, sch.after_s)):
        ax.barh(s, a * ms, left=e * ms, color=COLORS["sync"], height=0.8, linewidth=0)
        if sch.tied_s > 0 and s in sch.tied_stages:
            ax.barh(s, sch.tied_s * ms, left=tied_at * ms, color=COLORS["step"], height=0.8, linewidth=0)
    ax.axvline(step * ms, color="black", linewidth=0.6, linestyle=":")
    if single and single.feasible:
        ax.axvline(single.predicted_step_s * ms, color="black", linewidth=0.8, linestyle="--")
        ax.annotate(f" one stage: {single.predicted_step_s * ms:.4g} ms", (single.predicted_step_s * ms, -0.55),
                    fontsize=7, ha="right" if single.predicted_step_s > step else "left", va="bottom")
    labels = []
    for i, st in enumerate(plan.stages):
        kinds = sorted({plan.cluster.ranks[r].device for r in st.ranks})
        labels.append(f"stage {i}: ranks {ranks_text(st.ranks)} ({'/'.join(kinds)})\n{blocks_text(st.blocks)}")
    ax.set_yticks(range(k))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(k - 0.5, -0.8)
    ax.set_xlim(0, horizon * ms * 1.02)
    ax.set_xlabel("time in one training step (ms)")
    ax.set_title(f"predicted step {step * ms:.4g} ms: {sch.summary(k)}", fontsize=9)
    return _finish(fig, path, 1.9 + 0.55 * k, 0.35, [
        ("compute", "F: forward"), ("backward", "B: backward (last stage: forward + backward)"),
        ("comm", "cut: activations / gradients"), ("sync", "gradient all-reduce + optimizer"),
        ("step", "tied weights' all-reduce"), ("idle", "idle (bubble)")])


def draw_run(log: dict, path: str | Path) -> Path:
    """A training run as it went (``train.py --log-json``): per step and rank, the measured
    compute and the rest of the step (waiting for the slowest rank, communication, the
    optimizer), stacked; each re-balancing step is marked with the shares it set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compute, step_s = log.get("compute_s") or [], log["step_s"]
    if not compute:
        raise ValueError("this log has no per-rank compute (compute_s): it comes from a run that re-balances "
                         "(a plan of several ranks without --no-rebalance) or a pipelined one")
    first = int(log.get("first_step", 0))
    steps = list(range(first, first + len(compute)))
    n = len(compute[0])
    fig, axes = plt.subplots(n, 1, figsize=(10, 1.2 + 1.3 * n), sharex=True, squeeze=False)
    for r, ax in enumerate(axes[:, 0]):
        c = [row[r] * 1e3 for row in compute]
        rest = [max(0.0, s * 1e3 - x) for s, x in zip(step_s, c)]
        ax.bar(steps, c, color=COLORS["compute"], width=0.9, label="compute")
        ax.bar(steps, rest, bottom=c, color=COLORS["idle"], width=0.9, label="wait, communication, optimizer")
        ax.set_ylabel(f"rank {r}\nms")
        for e in log.get("rebalance", []):
            ax.axvline(e["step"] - 0.5, color=COLORS["sync"], linewidth=1)
            if r == 0:
                said = f" stage {e['stage']}: shares {e['shares']}" if "stage" in e else f" shares {e['shares']}"
                ax.annotate(said, (e["step"] - 0.5, ax.get_ylim()[1] * 0.95), fontsize=7,
                            color=COLORS["sync"], va="top", ha="left",
                            bbox={"facecolor": "white", "alpha": 0.85, "linewidth": 0})
    axes[0, 0].legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("measured compute per rank and step (red: re-balancing)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m hap.timeline LOG.json --out run.png``: draw a run's --log-json."""
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m hap.timeline", description=main.__doc__)
    ap.add_argument("log", help="the --log-json of a train.py run")
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    try:
        log = json.loads(Path(args.log).read_text())
        draw_run(log, args.out)
    except (OSError, ValueError, KeyError) as e:
        print(f"python -m hap.timeline: {args.log}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

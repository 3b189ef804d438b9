"""``hap-bench MATRIX.toml``: the benchmark matrix, run the same way on every machine.

    hap-bench benchmarks/matrix.toml [--cells 'mlp*'] [--out DIR] [--rounds N] [--steps N] [--check]

For each cell of the matrix (``hap.bench.matrix``): hap's plan and its baselines are planned and
emitted, and the single-device reference is trained (``hap.bench.prepare``, in a process with
the cell's environment); hap's program is checked against the reference once (a benchmark of a
wrong program is worthless: the cell fails and is not timed); then every strategy runs
``rounds`` times, interleaved (A B C A B C), so the machine's drift hits each alike, on the same
global batch and data. A cluster of one node runs under torchrun; one of several nodes under
hap-emulate, with real shaped links (root). Each rank's ``slowdown`` applies to every strategy.

Writes ``DIR/results.json`` (every step time, the environment: commit, versions, CPU model and
flags, each cluster file, the command), ``DIR/table.md`` (minimum, median and maximum step per
strategy, predicted against measured, speed-ups, exactness; and hap's step phase by phase,
measured against predicted) and ``DIR/steps.png``. With
``--check`` it exits 1 when a cell falls below one of its references; it exits 1 whenever a
cell's program is not exact.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hap.bench.matrix import TORCH_STRATEGIES, Cell, MatrixError, evaluate, load_matrix
from hap.bench.reference import errors
from hap.runtime.logger import PHASES

# (loss relative error, parameter error: max |a - b| / max |b| per tensor) allowed against one device
TOLERANCE = {"fp32": (1e-4, 1e-4), "bf16": (1e-2, 2e-2), "fp16": (1e-2, 2e-2)}
ROOT = Path(__file__).resolve().parents[2]


def environment(argv: list[str]) -> dict[str, Any]:
    """What a result depends on besides the code's numbers: the commit, versions, the CPU."""
    import torch

    from hap.machine import cpu_model

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    flags = ""
    try:
        flags = next(line.split(":", 1)[1] for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("pulp", "highspy", "transformers"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:  # noqa: BLE001  (not installed)
            pass
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "versions": versions, "cpu": cpu_model(), "cpu_flags": [f for f in wanted if f in flags.split()],
            "cores": os.cpu_count(), "gpus": torch.cuda.device_count(), "command": " ".join(["hap-bench", *argv]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load_average": _load()}


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


class Runner:
    """Launches one cell's programs: torchrun for one node, hap-emulate for several."""

    def __init__(self, cell: Cell, work: Path, logs: Path) -> None:
        from hap.cluster import load_cluster

        self.cell, self.work = cell, work
        self.cluster = load_cluster(cell.cluster)
        self.n = self.cluster.num_ranks
        self.env = {**os.environ, **cell.env, "OMP_NUM_THREADS": "1",
                    "HAP_EMULATE_SLOWDOWN": ",".join(f"{r.slowdown:g}" for r in self.cluster.ranks)}
        self.port = 29600
        self.logs, self.failures = logs, 0  # a failed run's whole output goes to logs/

    def why_not(self) -> str | None:
        if self.cluster.num_nodes > 1:
            from hap.emulated import EmulationError, check_tools

            try:
                check_tools()
            except EmulationError as e:
                return f"{self.cluster.num_nodes} nodes run under hap-emulate: {e}"
        return None

    def launch(self, program: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
        if self.cluster.num_nodes > 1:
            self.port += 1
            cmd = [sys.executable, "-m", "hap.emulated", self.cell.cluster, "--port", str(self.port), "--", *program]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.n}",
                   *program]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if done.returncode != 0:
            self.failures += 1
            self.logs.mkdir(parents=True, exist_ok=True)
            log = self.logs / f"{self.cell.name.replace('/', '_')}.failed-{self.failures}.log"
            log.write_text(f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
            raise RuntimeError(f"{_failure(done.stdout + done.stderr)} (exit {done.returncode}; output in {log})")
        return done

    def hap(self, strategy: str, steps: int, lr: float, log: Path, extra: list[str] = ()) -> None:
        train = self.work / strategy.replace(":", "-") / "train.py"
        emulate = [] if self.cluster.num_nodes > 1 else ["--emulate"]  # hap-emulate adds it
        self.launch([str(train), "--steps", str(steps), "--lr", str(lr), "--seed", "0", "--log-json", str(log),
                     *emulate, *extra])

    def torch(self, strategy: str, shares: list[int], gb: int, steps: int, lr: float, log: Path) -> None:
        kind = "fsdp2" if strategy == "fsdp2" else "ddp"
        self.launch(["-m", "hap.bench.torch_baseline", "--spec", self.cell.spec, "--strategy", kind,
                     "--global-batch", str(gb), "--shares", ",".join(map(str, shares)), "--steps", str(steps),
                     "--lr", str(lr), "--precision", self.cell.precision, "--log-json", str(log)])


def _failure(text: str) -> str:
    """The error a failed run ended with (its last exception line), else its last lines."""
    lines = text.splitlines()
    for pattern in (r"^\[rank\d+\]: \w*(Error|Exception|Exit)\b", r"\b(\w+Error|\w+Exception|SystemExit)\b:"):
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            return found[-1].strip()
    return text.strip()[-800:]


def exactness(runner: Runner, prepared: Path, steps: int, lr: float) -> dict[str, Any]:
    """hap's program against the single-device reference: the largest loss and parameter errors."""
    import torch

    log, dump = prepared / "exact.json", prepared / "exact.pt"
    runner.hap("hap", steps, lr, log, ["--dump-params", str(dump)])
    ref = torch.load(prepared / "reference.pt", weights_only=True)
    loss_err, param_err, problem = errors(json.loads(log.read_text())["losses"], torch.load(dump, weights_only=True),
                                          ref["losses"], ref["state"])
    if problem:
        return {"ok": False, "why": problem}
    loss_tol, param_tol = TOLERANCE[runner.cell.precision]
    return {"ok": loss_err <= loss_tol and param_err <= param_tol, "loss_err": loss_err, "param_err": param_err,
            "steps": steps, "tolerance": [loss_tol, param_tol]}


def run_cell(cell: Cell, run: dict[str, Any], progress, logs: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"cell": cell.name, "spec": cell.spec, "env": cell.env, "cluster": cell.cluster,
                           "cluster_file": Path(cell.cluster).read_text(), "precision": cell.precision,
                           "strategies": {}, "checks": []}
    with tempfile.TemporaryDirectory(prefix="hap-bench-") as tmp:
        work = Path(tmp)
        runner = Runner(cell, work, logs)
        why = runner.why_not()
        if why:
            out["skipped"] = why
            return out
        progress(f"{cell.name}: plan, emit, reference")
        prep = subprocess.run([sys.executable, "-m", "hap.bench.prepare", "--spec", cell.spec, "--cluster",
                               cell.cluster, "--precision", cell.precision, "--strategies", ",".join(cell.strategies),
                               "--out", str(work), "--exact-steps", str(run["exact_steps"]), "--lr", str(run["lr"])],
                              capture_output=True, text=True, env=runner.env)
        if prep.returncode != 0:
            out["failed"] = f"planning failed:\n{(prep.stdout + prep.stderr)[-2000:]}"
            return out
        prepared = json.loads((work / "prepared.json").read_text())
        gb = prepared["global_batch"]
        out["global_batch"] = gb
        torch_shares = {"ddp_even": prepared["even"], "ddp_proportional": prepared["proportional"],
                        "fsdp2": prepared["even"]}
        progress(f"{cell.name}: exactness against one device")
        out["exact"] = exactness(runner, work, run["exact_steps"], run["lr"])
        if not out["exact"]["ok"]:
            out["failed"] = "hap's program is not exact against one device"
            return out
        strategies = [s for s in cell.strategies if "skipped" not in prepared["hap"].get(s, {})]
        for s in cell.strategies:
            if s not in strategies:
                out["strategies"][s] = {"skipped": prepared["hap"][s]["skipped"]}
        times: dict[str, list[list[float]]] = {s: [] for s in strategies}
        phases: dict[str, list[dict[str, float]]] = {s: [] for s in strategies if s not in TORCH_STRATEGIES}
        for r in range(run["rounds"]):
            for s in list(strategies):  # interleaved: A B C A B C
                progress(f"{cell.name}: round {r + 1}/{run['rounds']}, {s}")
                log = work / f"{s.replace(':', '-')}.{r}.json"
                try:
                    if s in TORCH_STRATEGIES:
                        runner.torch(s, torch_shares[s], gb, run["steps"], run["lr"], log)
                    else:
                        runner.hap(s, run["steps"], run["lr"], log)
                    logged = json.loads(log.read_text())
                    steps = [float(x) for x in logged["step_s"]]
                    if s in phases:
                        phases[s] += critical_phases(logged.get("phase_s", {}))[run["warmup"]:]
                    if len(steps) != run["steps"]:
                        raise RuntimeError(f"{s} logged {len(steps)} step times for {run['steps']} steps")
                except RuntimeError as e:
                    out["strategies"][s] = {"skipped": f"it failed: {str(e)[-600:]}"}
                    times.pop(s, None)
                    strategies.remove(s)
                    continue
                times[s].append(steps[run["warmup"]:])
    for s, rounds in times.items():
        flat = [t for rr in rounds for t in rr]
        entry: dict[str, Any] = {"min_ms": min(flat) * 1e3, "median_ms": statistics.median(flat) * 1e3,
                                 "max_ms": max(flat) * 1e3,
                                 "round_medians_ms": [statistics.median(rr) * 1e3 for rr in rounds],
                                 "step_ms": [[t * 1e3 for t in rr] for rr in rounds]}
        if s in TORCH_STRATEGIES:
            entry["shares"] = torch_shares[s]
        else:
            h = prepared["hap"][s]
            entry.update(shares=h["shares"], plan=h["plan"], predicted_ms=h["predicted_s"] * 1e3,
                         pred_err=abs(h["predicted_s"] * 1e3 - entry["median_ms"]) / entry["median_ms"],
                         **({"pipeline": h["pipeline"]} if "pipeline" in h else {}))
            if phases.get(s):
                entry["phases_ms"] = {p: {"measured": statistics.median(row[p] for row in phases[s]) * 1e3,
                                          "predicted": h["phases_s"][p] * 1e3} for p in h["phases_s"]}
        out["strategies"][s] = entry
    out["strategies"] = {s: out["strategies"][s] for s in cell.strategies if s in out["strategies"]}  # file order
    out["metrics"] = metrics_of(out)
    out["checks"] = [dict(zip(("ok", "says"), evaluate(c, out["metrics"])), check=c) for c in cell.check]
    return out


def critical_phases(phase_s: dict[str, list[list[float]]]) -> list[dict[str, float]]:
    """Per step, the phases (``--log-json``'s ``phase_s``: phase -> per step, per rank) of the
    rank that computed longest: the rank the others wait for, whose phases sum to its step."""
    if not phase_s or not phase_s.get("compute"):
        return []
    out = []
    for i, per_rank in enumerate(phase_s["compute"]):
        r = max(range(len(per_rank)), key=lambda q: per_rank[q] + phase_s["exposed_comm"][i][q])
        out.append({p: rows[i][r] for p, rows in phase_s.items()})
    return out


def phase_table(results: list[dict[str, Any]]) -> str:
    """Measured (median over steps, on the rank that computed longest) against predicted, phase
    by phase, for each hap strategy that logged its phases."""
    lines = ["| cell | strategy | " + " | ".join(f"{p} ms" for p in PHASES) + " |",
             "|---|---|" + "---|" * len(PHASES)]
    for res in results:
        for s, e in res.get("strategies", {}).items():
            if "phases_ms" not in e:
                continue
            cells = [f"{e['phases_ms'][p]['measured']:.1f} ({e['phases_ms'][p]['predicted']:.1f})" for p in PHASES]
            lines.append(f"| {res['cell']} | {s} | " + " | ".join(cells) + " |")
    return "measured (predicted)\n\n" + "\n".join(lines) + "\n" if len(lines) > 2 else ""


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    st = {s: e for s, e in result["strategies"].items() if "median_ms" in e}
    m: dict[str, float] = {f"{s}_ms": e["median_ms"] for s, e in st.items()}
    if "hap" in st:
        m["pred_err"] = st["hap"]["pred_err"]
        for s, e in st.items():
            if s != "hap":
                m[f"speedup_vs_{s}"] = e["median_ms"] / st["hap"]["median_ms"]
    return m


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| cell | strategy | shares | min ms | median ms | max ms | predicted ms | error | hap's speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        if "skipped" in res or "failed" in res:
            lines.append(f"| {res['cell']} | {'skipped' if 'skipped' in res else 'FAILED'}: "
                         f"{(res.get('skipped') or res.get('failed')).splitlines()[0]} | | | | | | | |")
            continue
        hap_ms = res["strategies"]["hap"]["median_ms"]
        ex = res["exact"]
        exact = f"exact: loss {ex['loss_err']:.1e}, params {ex['param_err']:.1e}"
        for i, (s, e) in enumerate(res["strategies"].items()):
            name = res["cell"] + (f" ({exact})" if i == 0 else "")
            if "skipped" in e:
                lines.append(f"| {name} | {s}: not run ({e['skipped'].splitlines()[0][:120]}) | | | | | | | |")
                continue
            pred = f"{e['predicted_ms']:.1f}" if "predicted_ms" in e else ""
            err = f"{e['pred_err']:.1%}" if "pred_err" in e else ""
            speed = "" if s == "hap" else f"{e['median_ms'] / hap_ms:.2f}x"
            shares = ":".join(map(str, e.get("shares", [])))
            lines.append(f"| {name} | {s} | {shares} | {e['min_ms']:.1f} | {e['median_ms']:.1f} | {e['max_ms']:.1f} "
                         f"| {pred} | {err} | {speed} |")
        for c in res.get("checks", []):
            lines.append(f"| {res['cell']} | reference `{c['check']}` | | | | | | | "
                         f"{'ok' if c['ok'] else 'BELOW'}: {c['says'].split(': ', 1)[1]} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.get("strategies") and "hap" in r["strategies"]
            and "median_ms" in r["strategies"]["hap"]]
    if not done:
        return
    cols = min(3, len(done))
    rows = (len(done) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, res in zip(axes.flat, done):
        st = [(s, e) for s, e in res["strategies"].items() if "median_ms" in e]
        med = [e["median_ms"] for _, e in st]
        lo = [e["median_ms"] - e["min_ms"] for _, e in st]
        hi = [e["max_ms"] - e["median_ms"] for _, e in st]
        colors = ["tab:green" if s == "hap" else "tab:blue" if s.startswith("hap:") else "tab:gray" for s, _ in st]
        ax.bar(range(len(st)), med, yerr=[lo, hi], color=colors, capsize=3)
        for i, (_, e) in enumerate(st):
            if "predicted_ms" in e:
                ax.plot([i - 0.4, i + 0.4], [e["predicted_ms"]] * 2, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(st)), [s.replace("hap:", "hap:\n") for s, _ in st], fontsize=7)
        ax.set_title(res["cell"], fontsize=9)
        ax.set_ylabel("step ms (median, min-max)", fontsize=8)
    for ax in list(axes.flat)[len(done):]:
        ax.axis("off")
    fig.suptitle("hap-bench: step time per strategy (dashed: hap's prediction)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="hap-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("matrix", help="the matrix TOML (e.g. benchmarks/matrix.toml)")
    ap.add_argument("--cells", default="*", help="run only the cells whose name matches this glob")
    ap.add_argument("--out", default=None, help="results folder (default: bench-results/<date>)")
    ap.add_argument("--rounds", type=int, default=None, help="override [run] rounds")
    ap.add_argument("--steps", type=int, default=None, help="override [run] steps")
    ap.add_argument("--check", action="store_true", help="exit 1 when a cell falls below one of its references")
    args = ap.parse_args(argv)
    try:
        matrix = load_matrix(args.matrix)
    except MatrixError as e:
        print(f"hap-bench: {e}", file=sys.stderr)
        return 2
    run = dict(matrix.run)
    run.update({k: v for k, v in (("rounds", args.rounds), ("steps", args.steps)) if v is not None})
    cells = [c for c in matrix.cells if fnmatch.fnmatch(c.name, args.cells)]
    if not cells:
        print(f"hap-bench: no cell of {args.matrix} matches {args.cells!r}; cells: "
              f"{', '.join(c.name for c in matrix.cells)}", file=sys.stderr)
        return 2
    out = Path(args.out or f"bench-results/{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    from rich.console import Console

    console = Console(stderr=True)
    record: dict[str, Any] = {"environment": environment(argv), "matrix": matrix.path,
                              "matrix_file": Path(matrix.path).read_text(), "run": run, "cells": []}
    for i, cell in enumerate(cells):
        with console.status(f"[bold]hap-bench[/] cell {i + 1}/{len(cells)}") as status:
            res = run_cell(cell, run, lambda what, s=status, i=i: s.update(
                f"[bold]hap-bench[/] cell {i + 1}/{len(cells)}: {what}"), out / "logs")
        record["cells"].append(res)
        (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
        console.print(_line(res))
    record["environment"]["load_average_after"] = _load()
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "table.md").write_text(table(record["cells"]) + "\n" + phase_table(record["cells"]))
    plot(record["cells"], out / "steps.png")
    print(table(record["cells"]))
    print(phase_table(record["cells"]))
    print(f"wrote {out}/results.json, table.md, steps.png")
    wrong = [r["cell"] for r in record["cells"] if "exact" in r and not r["exact"]["ok"]]
    below = [(r["cell"], c["says"]) for r in record["cells"] for c in r.get("checks", []) if not c["ok"]]
    for cell, says in below:
        print(f"hap-bench: {cell} is below its reference: {says}", file=sys.stderr)
    if wrong:
        print(f"hap-bench: not exact against one device: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 1 if args.check and below else 0


def _line(res: dict[str, Any]) -> str:
    if "skipped" in res or "failed" in res:
        why = res.get("skipped") or res.get("failed")
        return f"{res['cell']}: {'skipped' if 'skipped' in res else 'FAILED'}: {why}"
    parts = [f"{s} {e['median_ms']:.1f} ms" for s, e in res["strategies"].items() if "median_ms" in e]
    m = res["metrics"]
    extra = f", predicted {res['strategies']['hap']['predicted_ms']:.1f} ms (error {m['pred_err']:.1%})"
    return f"{res['cell']}: " + ", ".join(parts) + extra


if __name__ == "__main__":
    sys.exit(main())

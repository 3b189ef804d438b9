"""Benchmark (h): planning the decoders people bring to mixed clusters.

    python benchmarks/plan_decoders.py [--cases 1b,8b,gpt2-512] [--out table.md]

Runs ``hap-plan ... --precision auto --optimizer adamw --compare --json`` as a user would, one
case after the other, and prints per case: whether the plan fits every rank (its fullest
rank's predicted memory against the capacity), the predicted step against the lower bound and
against the fastest baseline ``--compare`` prints, the solve time the plan reports and the
command's wall time (capture included).

    1b        HF Llama-3.2-1B shape (examples/hf_usage.py, HAP_HF_SIZE=1b, labels= as documented),
              seq 2048, batch 256, on profiles/clusters/a100-v100-2x2.toml
    8b        HF Llama-3-8B shape, seq 2048, batch 256, on profiles/clusters/a100-v100-4x4.toml
    gpt2-512  GPT-2 small (examples/gpt.py), seq 256, batch 4096, fp32 and SGD, on
              profiles/clusters/a100-v100-32x32.toml (512 ranks)
    moe8      HF Qwen2-MoE shape (HAP_HF_SIZE=plan: 24 blocks, width 1024, 8 experts of FFN 2816, top 2,
              a shared expert), seq 1024, 16 samples per GPU, on profiles/clusters/hap-paper.toml
    moe64     the same with 64 experts, 16 samples per GPU, on profiles/clusters/a100-v100-2x2.toml:
              the experts fit no replica, so they are sharded (expert parallelism)

The last column quotes the plan's note on the experts (sharded or whole, and the other's figure).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table

LLAMA_ARGS = ["--precision", "auto", "--optimizer", "adamw", "--compare"]
CASES = {
    "1b": ("examples/hf_usage.py", "a100-v100-2x2", {"HAP_HF_MODEL": "llama", "HAP_HF_SIZE": "1b"}, LLAMA_ARGS),
    "8b": ("examples/hf_usage.py", "a100-v100-4x4", {"HAP_HF_MODEL": "llama", "HAP_HF_SIZE": "8b"}, LLAMA_ARGS),
    "moe8": ("examples/hf_usage.py", "hap-paper", {"HAP_HF_MODEL": "qwen2_moe", "HAP_HF_SIZE": "plan"}, LLAMA_ARGS),
    "moe64": ("examples/hf_usage.py", "a100-v100-2x2", {"HAP_HF_MODEL": "qwen2_moe", "HAP_HF_SIZE": "plan",
                                                        "HAP_HF_EXPERTS": "64", "HAP_BATCH": "512"}, LLAMA_ARGS),
    "gpt2-512": ("examples/gpt.py", "a100-v100-32x32",
                 {"HAP_GPT_LAYERS": "12", "HAP_GPT_DIM": "768", "HAP_GPT_HEADS": "12", "HAP_GPT_VOCAB": "50257",
                  "HAP_GPT_SEQ": "256", "HAP_GPT_BATCH": "4096"}, ["--compare"]),
}


def run_case(name: str) -> list[str]:
    spec, cluster, env, extra = CASES[name]
    cmd = ["hap-plan", str(ROOT / spec), "--cluster", str(ROOT / "profiles/clusters" / f"{cluster}.toml"),
           "--json", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1][:100]
        return [name, cluster, f"exit {done.returncode}: {said}", "", "", "", "", f"{wall:.0f} s", ""]
    plan = json.loads(done.stdout)
    fullest = max(plan["ranks"], key=lambda r: r["memory_bytes"] / r["memory_capacity_bytes"])
    fits = all(r["memory_bytes"] <= r["memory_capacity_bytes"] for r in plan["ranks"])
    step, bound = plan["predicted_step_s"], plan["lower_bound_step_s"]
    feasible = {k: b["predicted_step_s"] for k, b in plan["baselines"].items() if b["feasible"]}
    best = min(feasible, key=feasible.get) if feasible else None
    return [name, cluster,
            f"{'yes' if fits else 'NO'} ({fullest['memory_bytes'] / 2**30:.1f} of "
            f"{fullest['memory_capacity_bytes'] / 2**30:.1f} GiB, rank {fullest['rank']})",
            f"{step * 1e3:.0f} ms", f"{step / bound:.2f}x",
            f"{best} {feasible[best] / step:.2f}x" if best else "none fits",
            f"{plan['solve_s']:.1f} s", f"{wall:.0f} s", experts_column(plan["notes"])]


def experts_column(notes: list[str]) -> str:
    """The plan's note on its experts, short: sharded (and the gain over keeping them whole), or whole."""
    note = next((n for n in notes if "experts of" in n), "")
    if "are sharded" in note:
        gain = re.search(r"([\d.]+)x the best plan", note)
        return "sharded" + (f", {gain.group(1)}x the whole-experts plan" if gain else "")
    if "whole on every rank" in note:
        return "whole" + (f" ({note.split(', as ')[-1]})" if ", as " in note else "")
    return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    head = ["case", "cluster", "fits", "predicted", "/ bound", "fastest baseline / hap", "solve", "wall", "experts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in args.cases.split(","):
        lines.append("| " + " | ".join(run_case(case)) + " |")
        print(lines[-1], flush=True)
    return print_table(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())

"""Processes: under torchrun, spawned CPU workers, or one process; and ``hap-profile``'s
command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .document import build_profile, write
from .harness import Settings
from .suites import measure


# ---------------------------------------------------------------------------------------
# processes: torchrun, spawned CPU workers, or one process
# ---------------------------------------------------------------------------------------
class _Progress:
    """A rich progress bar on rank 0 (silent elsewhere or when ``quiet``)."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        self.task = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]hap-profile[/]"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.description}"), transient=False)

    def total(self, n: int) -> None:
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("starting", total=n)

    def step(self, what: str) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, description=what[:60])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _worker(rank: int, world: int, port: int, quick: bool, repeats: int | None, show: bool,
            result: Any) -> None:
    """Measure on one rank of a group of ``world`` (spawned, or under torchrun when port is 0)."""
    import torch.distributed as dist

    if world > 1 and port:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    device = _device()
    if device.type == "cpu":
        torch.set_num_threads(1)
    if world > 1:
        import hap.runtime as hr

        hr.init()
    settings = Settings.make(device.type == "cuda", quick, repeats)
    torch.manual_seed(rank)
    bar = _Progress(show and rank == 0)
    try:
        res = measure(settings, device, bar.step, bar.total)
    finally:
        bar.close()
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, res)
        import hap.runtime as hr

        hr.shutdown()
    else:
        gathered = [res]
    if rank == 0:
        profile = build_profile(gathered, device, settings)
        if callable(result):
            result(profile)
        else:
            Path(result).write_text(json.dumps(profile) + "\n")


def run(quick: bool = False, repeats: int | None = None, nproc: int | None = None, show: bool = True,
        port: int = 29517) -> dict[str, Any]:
    """Measure and return the profile dict (spawning ``nproc`` CPU processes when not under torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    box: list[dict[str, Any]] = []
    if world > 1:  # under torchrun: every rank measures, rank 0 returns the profile
        _worker(int(os.environ.get("RANK", "0")), world, 0, quick, repeats, show, box.append)
        return box[0] if box else {}
    if nproc is None:
        nproc = 1 if torch.cuda.is_available() else 2
    if nproc <= 1:
        _worker(0, 1, 0, quick, repeats, show, box.append)
        return box[0]
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        mp.spawn(_worker, args=(nproc, port, quick, repeats, show, str(out)), nprocs=nproc, join=True)
        return json.loads(out.read_text())


def summary(profile: dict[str, Any]) -> str:
    lines = [f"device {profile['name']}: memory {profile['memory_bytes'] / 2**30:.1f} GiB"]
    for cls, rates in profile["flop_per_s"].items():
        lines.append(f"  {cls:9s} " + "  ".join(f"{dt} {v / 1e9:8.1f} GFLOP/s" for dt, v in rates.items()))
    by = profile.get("memory_bytes_per_s_by_class", {})
    lines.append("  memory    " + "  ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in by.items()))
    lines.append(f"  floor     {profile['kernel_floor_s'] * 1e6:.2f} us per kernel (autograd)")
    link = profile["intra_node"]
    lines.append(f"  link      {link['kind']}: alpha {link['alpha_s'] * 1e6:.1f} us, "
                 f"{link['bytes_per_s'] / 1e9:.3f} GB/s")
    for key, f in profile.get("detail", {}).get("measurements", {}).get("collectives", {}).items():
        bw = f"{f['bytes_per_s'] / 1e9:.3f} GB/s" if f["bytes_per_s"] else "-"
        lines.append(f"    {key:28s} alpha {f['alpha_s'] * 1e6:8.1f} us  {bw}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hap-profile",
                                 description="Measure this machine's device (and its links) as a device profile.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="profile JSON to write (default: ./hap-profile-<device>.json; to recalibrate the "
                         "shipped CPU profile: --out profiles/devices/cpu.json)")
    ap.add_argument("--quick", action="store_true", help="few small sizes and 3 repeats (seconds, not minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="samples per measurement (default 7 CPU, 9 CUDA)")
    ap.add_argument("--nproc", type=int, default=None,
                    help="CPU: concurrent single-thread processes to measure with (default 2; ignored under "
                         "torchrun, which sets the group)")
    ap.add_argument("--port", type=int, default=29517, help="rendezvous port of the spawned CPU processes")
    ap.add_argument("--links", default=None, metavar="CLUSTER.toml",
                    help="measure the cluster's links (intra-node, inter-node; point to point, all-reduce, "
                         "all-to-all) under torchrun across its nodes and write them into the file's "
                         "[network.measured] (or into --out)")
    ap.add_argument("--emulated", action="store_true",
                    help="with --links: measure the links of an emulated copy of the cluster (hap-emulate)")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        print("hap-profile: --repeats must be at least 1", file=sys.stderr)
        return 2
    if args.links:
        return _links(args)
    try:
        profile = run(quick=args.quick, repeats=args.repeats, nproc=args.nproc, port=args.port)
    except KeyboardInterrupt:
        print("hap-profile: interrupted", file=sys.stderr)
        return 130
    if not profile:  # a rank other than 0 under torchrun
        return 0
    out, side = write(profile, Path(args.out or f"hap-profile-{profile['name']}.json"))
    print(summary(profile))
    print(f"wrote {out} (samples: {side})")
    return 0


def _links(args: argparse.Namespace) -> int:
    """``--links``: under torchrun, measure; otherwise start the processes that do."""
    import subprocess

    from hap.cluster import load_cluster
    from hap.errors import HapError

    from . import links

    try:
        cluster = load_cluster(args.links, measured=False)  # as declared: a new measurement replaces the old
    except HapError as e:
        print(f"hap-profile: {e}", file=sys.stderr)
        return 2
    passed = ["--links", args.links, *(["--quick"] if args.quick else []),
              *(["--repeats", str(args.repeats)] if args.repeats else []), *(["--out", args.out] if args.out else [])]
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return links.run(args.links, cluster, args.quick, args.repeats, args.out, _device(), _Progress)
    if args.emulated:
        from hap.emulated import main as emulate

        return emulate([args.links, "--port", str(args.port), "--", "-m", "hap.profile", *passed])
    if cluster.num_nodes == 1 and cluster.num_ranks > 1:  # one machine: its ranks, started here
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={cluster.num_ranks}", "-m", "hap.profile", *passed]
        return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    print(f"hap-profile: --links measures {args.links}'s {cluster.num_nodes} nodes from inside them: run it under "
          f"torchrun on each node (torchrun --nnodes {cluster.num_nodes} --node-rank i --nproc-per-node <its count> "
          f"-m hap.profile --links {args.links}), or add --emulated to measure an emulated copy on this machine",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

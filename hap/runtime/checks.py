"""Start-up checks of an emitted program: is this rank on the device, and on the node, the
plan expects?"""
from __future__ import annotations

import os
import re

import torch


def device_mismatch(expected: str, device: torch.device) -> str | None:
    """None when ``device`` is the kind the plan expects for this rank (``"cpu"``, ``"V100-16GB"``
    ...), else a sentence saying what differs."""
    if expected == "cpu":
        return None if device.type == "cpu" else f"the plan expects a CPU rank, this rank runs on {device}"
    if device.type != "cuda":
        return f"the plan expects a {expected} GPU, but this rank has no CUDA device"
    props = torch.cuda.get_device_properties(device)
    model = expected.split("-")[0].upper()  # "V100-16GB" -> "V100"
    if model not in props.name.upper().replace(" ", ""):
        return f"the plan expects a {expected}, this rank has a {props.name}"
    m = re.search(r"(\d+)GB", expected.upper())
    if m:
        want = int(m.group(1)) * 2**30
        if abs(props.total_memory - want) > 0.15 * want:
            return f"the plan expects {expected} ({m.group(1)} GB), this {props.name} has " \
                   f"{props.total_memory / 2**30:.0f} GiB"
    return None


def placement_mismatch(node: int, local_rank: int, local_world: int) -> str | None:
    """None when torchrun started this rank where the plan puts it: node ``node`` (torchrun's
    ``--node-rank``, GROUP_RANK), local rank ``local_rank`` of ``local_world`` processes there.
    A node started with another ``--node-rank`` or ``--nproc-per-node`` gives its ranks
    other devices' shares, so it is refused. One torchrun agent for the whole job (one
    process, or ``--standalone`` emulating a cluster on one machine) has no nodes to mix up."""
    env = {k: os.environ.get(k) for k in ("GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    if any(v is None for v in env.values()) or int(os.environ.get("GROUP_WORLD_SIZE", "1")) <= 1:
        return None
    got = (int(env["GROUP_RANK"]), int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"]))
    if got == (node, local_rank, local_world):
        return None
    return (f"torchrun started it as local rank {got[1]} of {got[2]} on node {got[0]} (--node-rank {got[0]}), "
            f"but the plan puts it at local rank {local_rank} of {local_world} on node {node}: start node {node} "
            f"with --node-rank {node} --nproc-per-node {local_world}")

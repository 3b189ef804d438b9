"""Start-up checks of an emitted program: is this rank on the device, and on the node, the
plan expects?"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch

MEMORY_SLACK = 0.10  # a card reports less than its label (an "L4-24GB" has 24.1e9 bytes, 22.5 GiB)


class Refused(Exception):
    """A rank-local start-up problem, with the message ``program.agree_or_stop`` prints."""


def backend_for(expected: tuple[str, ...] | list[str]) -> str:
    """The process-group backend of a plan whose ranks expect these devices: gloo when every
    rank is a CPU rank (also on a machine that has GPUs), else NCCL. A plan that mixes CPU and
    GPU ranks cannot run as one NCCL or gloo job: ValueError."""
    cpu = [d == "cpu" for d in expected]
    if all(cpu):
        return "gloo"
    if any(cpu):
        raise ValueError(f"the plan mixes CPU and GPU ranks ({', '.join(sorted(set(expected)))}); one job runs "
                         "on CPUs (gloo) or on GPUs (NCCL): re-plan for a cluster of one kind")
    return "nccl"


def cuda_missing(expected: Sequence[str]) -> str | None:
    """None when this machine can run a plan whose ranks expect these GPUs, else what the plan
    needs and what the machine has (checked before any CUDA call: a CPU-only torch build has no
    ``torch.cuda.set_device`` to call)."""
    gpus = sorted({d for d in expected if d != "cpu"})
    if not gpus:
        return None
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        has = f"a CPU-only torch build (torch {torch.__version__})"
    elif not torch.cuda.is_available():
        has = f"no usable CUDA device (torch {torch.__version__} with CUDA {torch.version.cuda or torch.version.hip})"
    else:
        return None
    return (f"this plan runs on GPUs ({', '.join(gpus)}, NCCL), but this machine has {has}; run it on the planned "
            "machines, or re-plan for this one (hap-plan SPEC --emit DIR: with no --cluster it plans for this "
            "machine's own devices)")


def device_mismatch(expected: str, device: torch.device) -> str | None:
    """None when ``device`` is the kind the plan expects for this rank (``"cpu"``, ``"V100-16GB"``
    ...), else a sentence saying what differs. A GPU matches by its model's name on word
    boundaries ("A10" is not an "A100" or an "A10G"), with at least the planned memory (less
    than ``MEMORY_SLACK`` short of the label); a MIG slice is refused: it has a part of the
    card's compute and memory that the plan did not count."""
    if expected == "cpu":
        return None if device.type == "cpu" else f"the plan expects a CPU rank, this rank runs on {device}"
    if device.type != "cuda":
        return f"the plan expects a {expected} GPU, but this rank has no CUDA device"
    props = torch.cuda.get_device_properties(device)
    name = props.name.upper()
    if _has_word(name, "MIG"):
        return f"the plan expects a whole {expected}, this rank has a MIG slice ({props.name})"
    if not _has_word(name, expected.split("-")[0].upper()):  # "V100-16GB" -> "V100"
        return f"the plan expects a {expected}, this rank has a {props.name}"
    m = re.search(r"(\d+)GB", expected.upper())
    if m and props.total_memory < int(m.group(1)) * 1e9 * (1 - MEMORY_SLACK):
        return (f"the plan expects {expected} ({m.group(1)} GB), this {props.name} has "
                f"{props.total_memory / 1e9:.1f} GB")
    return None


def planned_gpu(expected: Sequence[str], places: Sequence[tuple[int, int, int]], rank: int) -> int | None:
    """The CUDA device index of ``rank``: the n-th visible GPU of the model the plan put it on,
    where n counts the ranks before it on its node planned on that model. On a node of one GPU
    model this is the local rank; on a mixed node it finds each rank its kind of card whatever
    order CUDA lists them in (fastest first by default, not the cluster file's order). None for
    a CPU rank, or when the node has too few such GPUs (the device check then says so)."""
    if expected[rank] == "cpu" or not torch.cuda.is_available():
        return None
    node, local, _ = places[rank]
    nth = sum(1 for r, p in enumerate(places) if p[0] == node and p[1] < local and expected[r] == expected[rank])
    matching = [i for i in range(torch.cuda.device_count())
                if device_mismatch(expected[rank], torch.device("cuda", i)) is None]
    return matching[nth] if nth < len(matching) else None


def _has_word(text: str, word: str) -> bool:
    """``word`` in ``text`` with no letter or digit on either side ("A10" is not in "A100")."""
    return re.search(rf"(?<![A-Z0-9]){re.escape(word)}(?![A-Z0-9])", text) is not None


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

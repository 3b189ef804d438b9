"""Start-up checks of an emitted program: is this rank on the device the plan expects?"""
from __future__ import annotations

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

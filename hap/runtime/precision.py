"""Mixed precision in the emitted program: autocast around forward, fp32 master weights, and
for fp16 dynamic loss scaling whose skip decision every rank shares.

bf16 keeps fp32's exponent range, so it needs no loss scaling. fp16 does: the loss is scaled
before backward, the gradients unscaled before clipping and the step, and a step whose
gradients hold an inf or NaN is skipped while the scale backs off. The ranks hold different
shards of the gradients, so one rank can overflow where another does not; a skip on some
ranks only would let the replicas diverge. ``ShardedGradScaler`` (torch's scaler for sharded
gradients) all-reduces the found-inf flag over the process group before deciding, with
``GradScaler``'s defaults; a single process uses ``torch.amp.GradScaler`` itself.

The decision is single-device training's except at the edge of fp16's range: a rank's
gradient is a partial sum over its share of the batch, computed in fp16 before the ranks
add them up in fp32, and a partial sum can overflow where the whole sum does not (terms of
opposite sign), or the other way round. Then the scale backs off one step earlier or later
than on one device (docs/precision.md); every rank still takes the same decision.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device) -> None:
        if name not in ("fp32", *DTYPES):
            raise ValueError(f"PRECISION {name!r}: expected fp32, bf16 or fp16")
        self.name, self.device = name, device
        self.skipped = 0  # fp16 steps skipped for overflowing gradients
        self.scaler = None
        if name == "fp16":
            import torch.distributed as dist

            if dist.is_initialized() and dist.get_world_size() > 1:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(device.type, process_group=dist.group.WORLD)
            else:
                self.scaler = torch.amp.GradScaler(device.type)

    @property
    def skips_overflow(self) -> bool:
        """Whether a step whose gradients overflow is skipped (fp16's loss scaling) rather than applied."""
        return self.scaler is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Make the gradients true gradients (before clipping reads them)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            opt.step()
            return
        before = self.scaler.get_scale()
        self.scaler.step(opt)  # unscales first if unscale() was not called
        self.scaler.update()
        if self.scaler.get_scale() < before:
            self.skipped += 1

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

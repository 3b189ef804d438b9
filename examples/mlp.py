"""A wide MLP regressor: the smallest model in the spec protocol.

Spec protocol (used by hap-plan, the examples, the tests):
  model() -> nn.Module whose forward(*batch) returns the scalar training loss
  batch(step, batch_size) -> tuple of tensors, dim 0 = samples, deterministic per step
  BATCH_SIZE: the default global batch
Sizes can be overridden with HAP_MLP_WIDTH / HAP_MLP_DEPTH (e.g. a wide MLP that is
communication-bound under data parallelism).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

IN_FEATURES = 64
WIDTH = int(os.environ.get("HAP_MLP_WIDTH", "256"))
DEPTH = int(os.environ.get("HAP_MLP_DEPTH", "3"))
OUT_FEATURES = 16
BATCH_SIZE = int(os.environ.get("HAP_MLP_BATCH", "64"))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        dims = [IN_FEATURES] + [WIDTH] * DEPTH
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(WIDTH, OUT_FEATURES)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return F.mse_loss(self.out(x), y)


def model() -> nn.Module:
    return MLP()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch_size, IN_FEATURES, generator=g)
    y = torch.randn(batch_size, OUT_FEATURES, generator=g)
    return x, y

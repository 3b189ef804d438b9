"""A small regressor that goes wrong on demand, for the tests of clean stops
(tests/e2e/test_stops.py). HAP_TEST_FAULT, read when the program calls the spec:
  model   rank 1 builds a wider model than the one planned (another node's spec or settings)
  batch   batch() returns one sample too few at step 2
  grad    the loss stays finite while its gradient is NaN (d/dz sqrt(0 * z) at z = 0)
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 16


def fault() -> str:
    return os.environ.get("HAP_TEST_FAULT", "")


class Regressor(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(8, width)
        self.out = nn.Linear(width, 4)
        self.z = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(self.out(F.relu(self.lin(x))), y)
        if fault() == "grad":
            loss = loss + (self.z * 0.0).sqrt().sum()
        return loss


def model() -> nn.Module:
    return Regressor(32 if fault() == "model" and os.environ.get("RANK") == "1" else 16)


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(step)
    n = batch_size - 1 if fault() == "batch" and step == 2 else batch_size
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)

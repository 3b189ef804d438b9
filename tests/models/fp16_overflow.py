"""An MLP whose first fp16 backwards overflow under GradScaler's initial scale (2**16): its
targets are large, so the scaled gradients exceed fp16's range (65504) until the scale has
backed off (single-device training skips steps 0-3 and 5 of 8)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 32
TARGET_SCALE = 200.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x, y):
        return F.mse_loss(self.out(F.relu(self.fc2(F.relu(self.fc1(x))))), y)


def model():
    return Net()


def batch(step, batch_size):
    g = torch.Generator().manual_seed(70 + step)
    return torch.randn(batch_size, 16, generator=g), TARGET_SCALE * torch.randn(batch_size, 4, generator=g)

"""An MLP with dropout after every hidden layer: random ops in training, for the random streams
of hap.runtime.rng (each rank its own stream for its part, the same values where replicated)."""
import torch
from torch import nn

BATCH_SIZE = 48
D, H = 32, 128


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(D, H), nn.Linear(H, H), nn.Linear(H, 4)
        self.drop = nn.Dropout(0.3)

    def forward(self, x, y):
        h = self.drop(torch.relu(self.fc1(x)))
        h = self.drop(torch.relu(self.fc2(h)))
        return nn.functional.mse_loss(self.out(h), y)


def model():
    return Net()


def batch(step, batch_size):
    g = torch.Generator().manual_seed(step)
    return torch.randn(batch_size, D, generator=g), torch.randn(batch_size, 4, generator=g)

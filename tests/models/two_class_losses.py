"""Two class losses in one forward, each with ignored targets, after a BatchNorm: the program
cannot defer both counts to the gradient sync, so its first forward runs again counting each in
forward, and BatchNorm's running statistics must count that step once."""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 24


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.a = nn.Linear(16, 5)
        self.b = nn.Linear(16, 3)

    def forward(self, x, ya, yb):
        h = F.relu(self.bn(self.fc(x)))
        return F.cross_entropy(self.a(h), ya, ignore_index=-100) + F.cross_entropy(self.b(h), yb, ignore_index=-100)


def model() -> nn.Module:
    return TwoHeads()


def batch(step: int, batch_size: int):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(batch_size, 8, generator=g)
    ya = torch.randint(0, 5, (batch_size,), generator=g)
    ya[::4] = -100
    yb = torch.randint(0, 3, (batch_size,), generator=g)
    yb[1::3] = -100
    return x, ya, yb

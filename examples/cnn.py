"""A small CNN classifier: convolutions, ReLU, max pooling, a linear head.

HAP_CNN_BATCH sets the global batch (a large batch makes it compute-bound).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES = 10
BATCH_SIZE = int(os.environ.get("HAP_CNN_BATCH", "32"))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, CLASSES)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(images)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        logits = self.fc(torch.flatten(x, 1))
        return F.cross_entropy(logits, labels)


def model() -> nn.Module:
    return CNN()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3000 + step)
    images = torch.randn(batch_size, 3, 32, 32, generator=g)
    labels = torch.randint(0, CLASSES, (batch_size,), generator=g)
    return images, labels

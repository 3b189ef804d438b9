"""VGG19 on 32x32 images (CIFAR-10 shape), 10 classes, as in the HAP paper's evaluation:
16 convolutions (3x3, padding 1) with ReLU, 5 max-pools, and the classifier
512 -> 4096 -> 4096 -> 10 with dropout. Plain VGG19 (no BatchNorm), initialised like
torchvision (Kaiming-normal convolutions, N(0, 0.01) linears, zero biases).

Environment variables:
  HAP_SIZE=paper     full VGG19 (widths 64..512, classifier 4096); default "tiny":
                     the same 19 weight layers with widths divided by 16 (4..32, classifier 64)
  HAP_BATCH=N        global batch (default: 8 tiny, 2048 paper = 32 per GPU of the HAP cluster)
  HAP_DROPOUT=p      classifier dropout (default 0, so distributed training is exactly
                     single-device training; the original uses 0.5)
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

PAPER = os.environ.get("HAP_SIZE", "tiny") == "paper"
DIV = 1 if PAPER else 16
CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
HIDDEN = 4096 // DIV
CLASSES = 10
DROPOUT = float(os.environ.get("HAP_DROPOUT", "0"))
BATCH_SIZE = int(os.environ.get("HAP_BATCH", "2048" if PAPER else "8"))


class VGG19(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v // DIV, 3, padding=1), nn.ReLU()]
                c = v // DIV
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c, HIDDEN), nn.ReLU(), nn.Dropout(DROPOUT),
            nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Dropout(DROPOUT),
            nn.Linear(HIDDEN, CLASSES),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(images), 1)  # [B, 512, 1, 1] -> [B, 512]
        return F.cross_entropy(self.classifier(x), labels)


def model() -> nn.Module:
    return VGG19()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(4000 + step)
    images = torch.randn(batch_size, 3, 32, 32, generator=g)
    labels = torch.randint(0, CLASSES, (batch_size,), generator=g)
    return images, labels

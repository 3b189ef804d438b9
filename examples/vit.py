"""ViT on 32x32 images (CIFAR-10 shape), 10 classes, as in the HAP paper's evaluation:
4x4 patches (64 tokens + a class token), pre-LayerNorm encoder blocks with
scaled_dot_product_attention and a GELU MLP (4x width), classification from the class
token. Weights N(0, 0.02), biases 0, LayerNorm 1/0 (as in the original ViT / timm).

Environment variables:
  HAP_SIZE=paper     12 layers, width 768, 12 heads, 4x4 patches (ViT-Base on CIFAR);
                     default "tiny": 2 layers, width 32, 4 heads, 8x8 patches
  HAP_BATCH=N        global batch (default: 8 tiny, 2048 paper = 32 per GPU of the HAP cluster)
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

PAPER = os.environ.get("HAP_SIZE", "tiny") == "paper"
LAYERS, DIM, HEADS, PATCH = (12, 768, 12, 4) if PAPER else (2, 32, 4, 8)
IMAGE, CLASSES = 32, 10
TOKENS = (IMAGE // PATCH) ** 2
BATCH_SIZE = int(os.environ.get("HAP_BATCH", "2048" if PAPER else "8"))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.ln2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, 4 * DIM)
        self.fc2 = nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(DIM, dim=2)
        q = q.view(b, t, HEADS, c // HEADS).transpose(1, 2)
        k = k.view(b, t, HEADS, c // HEADS).transpose(1, 2)
        v = v.view(b, t, HEADS, c // HEADS).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.cls = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos = nn.Parameter(torch.randn(1, TOKENS + 1, DIM) * 0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, 0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)  # [B, TOKENS, DIM]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.ln(x[:, 0])), labels)


def model() -> nn.Module:
    return ViT()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5000 + step)
    images = torch.randn(batch_size, 3, IMAGE, IMAGE, generator=g)
    labels = torch.randint(0, CLASSES, (batch_size,), generator=g)
    return images, labels

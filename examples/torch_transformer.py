"""A causal language model on torch's own ``nn.TransformerEncoder`` (whose layers use
``nn.MultiheadAttention``), written as the torch documentation shows: a square
subsequent mask and ``is_causal=True``, ``batch_first=True``, dropout 0 so distributed
training is exactly single-device training.

Environment variables:
  HAP_BATCH=N   global batch (default 12)
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, DIM, HEADS, FFN, LAYERS = 64, 12, 32, 4, 64, 2
BATCH_SIZE = int(os.environ.get("HAP_BATCH", "12"))


class CausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        layer = nn.TransformerEncoderLayer(DIM, nhead=HEADS, dim_feedforward=FFN, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(SEQ)
        h = self.encoder(self.embed(tokens), mask=mask, is_causal=True)
        return F.cross_entropy(self.head(h).reshape(-1, VOCAB), targets.reshape(-1))


def model() -> nn.Module:
    return CausalLM()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(14000 + step)
    data = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()

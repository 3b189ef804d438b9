"""A small GPT-2 style language model: token + position embeddings, causal
self-attention (scaled_dot_product_attention), LayerNorm, GELU MLP, tied LM head.

Sizes come from HAP_GPT_* environment variables so the same spec serves tests
(tiny, the default) and planning at GPT-2-small shape:
  HAP_GPT_LAYERS=12 HAP_GPT_DIM=768 HAP_GPT_HEADS=12 HAP_GPT_VOCAB=50257 HAP_GPT_SEQ=256 HAP_GPT_BATCH=64
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYERS = int(os.environ.get("HAP_GPT_LAYERS", "2"))
DIM = int(os.environ.get("HAP_GPT_DIM", "64"))
HEADS = int(os.environ.get("HAP_GPT_HEADS", "4"))
VOCAB = int(os.environ.get("HAP_GPT_VOCAB", "256"))
SEQ = int(os.environ.get("HAP_GPT_SEQ", "32"))
BATCH_SIZE = int(os.environ.get("HAP_GPT_BATCH", "16"))


class Block(nn.Module):
    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.fc_out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q = q.view(b, t, h, c // h).transpose(1, 2)
        k = k.view(b, t, h, c // h).transpose(1, 2)
        v = v.view(b, t, h, c // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        x = x + self.fc_out(F.gelu(self.fc(self.ln2(x))))
        return x


class GPT(nn.Module):
    def __init__(self, vocab: int = VOCAB, seq: int = SEQ, dim: int = DIM, layers: int = LAYERS,
                 heads: int = HEADS) -> None:
        super().__init__()
        self.vocab = vocab
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied embeddings
        nn.init.normal_(self.tok.weight, std=0.02)  # GPT-2's initialisation
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, self.vocab), targets.view(-1))


def model() -> nn.Module:
    return GPT()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2000 + step)
    data = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()

"""BERT-Base with a masked-language-model loss, as in the HAP paper's evaluation (which
trained it on WikiText-2): token + position + segment embeddings, post-LayerNorm encoder
layers with scaled_dot_product_attention under a padding mask, a GELU feed-forward, and
the MLM head (dense, GELU, LayerNorm, decoder tied to the token embeddings). Weights
N(0, 0.02), biases 0, LayerNorm 1/0, as in the original.

The batch is (input_ids, attention_mask, labels), each [B, SEQ]: samples of random
length (SEQ/2..SEQ) padded with 0, attention_mask 1 on real tokens, 15% of the real
tokens (and always the first) replaced by [MASK] with their id as the label, -100
elsewhere (ignored by the loss).

Environment variables:
  HAP_SIZE=paper     BERT-Base: 12 layers, width 768, 12 heads, FFN 3072, vocab 30522, seq 128;
                     default "tiny": 2 layers, width 32, 4 heads, FFN 64, vocab 128, seq 16
  HAP_BATCH=N        global batch (default: 8 tiny, 512 paper = 8 per GPU of the HAP cluster)
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

PAPER = os.environ.get("HAP_SIZE", "tiny") == "paper"
LAYERS, DIM, HEADS, FFN, VOCAB, SEQ = (12, 768, 12, 3072, 30522, 128) if PAPER else (2, 32, 4, 64, 128, 16)
BATCH_SIZE = int(os.environ.get("HAP_BATCH", "512" if PAPER else "8"))
PAD_ID, MASK_ID, FIRST_WORD = 0, 1, 2


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, FFN)
        self.fc2 = nn.Linear(FFN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.q = nn.Linear(DIM, DIM)
        self.k = nn.Linear(DIM, DIM)
        self.v = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, DIM)
        self.ln1 = nn.LayerNorm(DIM, eps=1e-12)
        self.ffn = ffn
        self.ln2 = nn.LayerNorm(DIM, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, HEADS, c // HEADS).transpose(1, 2)
        k = self.k(x).view(b, t, HEADS, c // HEADS).transpose(1, 2)
        v = self.v(x).view(b, t, HEADS, c // HEADS).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.ln1(x + self.out(y.transpose(1, 2).reshape(b, t, c)))
        return self.ln2(x + self.ffn(x))


class Bert(nn.Module):
    def __init__(self, ffn=None) -> None:
        """``ffn(layer_index)`` builds each layer's feed-forward (default: ``FeedForward``)."""
        super().__init__()
        self.word = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(SEQ, DIM)
        self.segment = nn.Embedding(2, DIM)
        self.ln = nn.LayerNorm(DIM, eps=1e-12)
        self.layers = nn.ModuleList(Layer(ffn(i) if ffn else FeedForward()) for i in range(LAYERS))
        self.dense = nn.Linear(DIM, DIM)
        self.head_ln = nn.LayerNorm(DIM, eps=1e-12)
        self.decoder = nn.Linear(DIM, VOCAB)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        self.decoder.weight = self.word.weight  # tied, as in BERT

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.word(input_ids) + self.pos(pos) + self.segment(torch.zeros_like(input_ids))
        x = self.ln(x)
        mask = attention_mask[:, None, None, :].bool()  # [B, 1, 1, T]: attend to real tokens only
        for layer in self.layers:
            x = layer(x, mask)
        h = self.head_ln(F.gelu(self.dense(x)))
        logits = self.decoder(h)
        return F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)


def model() -> nn.Module:
    return Bert()


def mlm_batch(seed: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(FIRST_WORD, VOCAB, (batch_size, SEQ), generator=g)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (batch_size, 1), generator=g)
    real = torch.arange(SEQ)[None, :] < lengths
    chosen = (torch.rand(batch_size, SEQ, generator=g) < 0.15) & real
    chosen[:, 0] = True
    input_ids = torch.where(chosen, torch.full_like(words, MASK_ID), words).masked_fill(~real, PAD_ID)
    labels = torch.where(chosen, words, torch.full_like(words, -100))
    return input_ids, real.long(), labels


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    return mlm_batch(6000 + step, batch_size)

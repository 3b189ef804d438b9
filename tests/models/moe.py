"""Top-1 gated mixture of experts written with einsum / one_hot / topk, plus an op
without a sharding rule (torch.special.i0e) and a tied embedding / head."""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 12
EXPERTS, DIM, HID, VOCAB, SEQ = 4, 16, 32, 40, 6


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        nn.init.normal_(self.emb.weight, std=0.1)
        self.gate = nn.Linear(DIM, EXPERTS)
        self.w_in = nn.Parameter(torch.randn(EXPERTS, DIM, HID) * 0.1)
        self.w_out = nn.Parameter(torch.randn(EXPERTS, HID, DIM) * 0.1)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx, tgt):
        x = self.emb(idx)                                   # [B, T, D]
        probs = F.softmax(self.gate(x), dim=-1)             # [B, T, E]
        top, which = torch.topk(probs, 1, dim=-1)
        route = F.one_hot(which.squeeze(-1), EXPERTS).to(x.dtype) * top  # [B, T, E]
        h = torch.einsum("btd,edh->bteh", x, self.w_in)
        h = F.gelu(h)
        y = torch.einsum("bteh,ehd->bted", h, self.w_out)
        y = torch.einsum("bted,bte->btd", y, route)
        y = x + torch.special.i0e(y)                        # no sharding rule: runs replicated
        logits = self.head(y)
        return F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1))


def model():
    return MoE()


def batch(step, batch_size):
    g = torch.Generator().manual_seed(70 + step)
    return (torch.randint(0, VOCAB, (batch_size, SEQ), generator=g),
            torch.randint(0, VOCAB, (batch_size, SEQ), generator=g))

"""BERT with top-2-gated mixture-of-experts feed-forward layers (GShard-style), the
HAP paper's BERT-MoE: every second encoder layer's FFN is a set of EXPERTS expert FFNs;
a linear gate picks the top 2 experts of every token, and each expert takes at most
CAPACITY tokens of each sample (later tokens overflow and pass through the residual).

The expert computation is dense einsums over one-hot dispatch and combine tensors
[B, T, EXPERTS, CAPACITY] built with topk / one_hot / cumsum, so it captures with
torch.export and the planner can shard the expert dim (expert parallelism: the
dispatch einsum becomes an all-to-all between the batch-sharded and the
expert-sharded layout) or the batch.

Environment variables (with those of bert.py: HAP_SIZE, HAP_BATCH):
  HAP_MOE_EXPERTS=E  number of experts per MoE layer (default 4; the paper uses 2 x ranks,
                     e.g. 128 on the 64-GPU HAP cluster — a spec cannot know the ranks)
  HAP_MOE_CAPACITY=f capacity factor (default 1.25): CAPACITY = ceil(f * 2 * SEQ / EXPERTS)
"""
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bert import BATCH_SIZE, DIM, FFN, SEQ, Bert, FeedForward, mlm_batch

EXPERTS = int(os.environ.get("HAP_MOE_EXPERTS", "4"))
CAPACITY = max(1, math.ceil(float(os.environ.get("HAP_MOE_CAPACITY", "1.25")) * 2 * SEQ / EXPERTS))
__all__ = ["BATCH_SIZE", "batch", "model"]


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(DIM, EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.randn(EXPERTS, DIM, FFN) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(EXPERTS, FFN))
        self.w2 = nn.Parameter(torch.randn(EXPERTS, FFN, DIM) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(EXPERTS, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        probs = F.softmax(self.gate(x), dim=-1)                        # [B, T, E]
        top_p, top_i = torch.topk(probs, 2, dim=-1)                     # [B, T, 2]
        top_p = top_p / top_p.sum(-1, keepdim=True)
        chosen = F.one_hot(top_i, EXPERTS)                              # [B, T, 2, E]
        # slot of each (token, choice) in its expert: first choices of all tokens first
        order = chosen.transpose(1, 2).reshape(b, 2 * t, EXPERTS)       # [B, 2T, E]
        slot = (torch.cumsum(order, dim=1) - 1) * order
        slot = slot.view(b, 2, t, EXPERTS).transpose(1, 2)              # [B, T, 2, E]
        keep = chosen * (slot < CAPACITY).long()                        # overflowing tokens dropped
        slots = F.one_hot(slot.clamp(max=CAPACITY - 1), CAPACITY)       # [B, T, 2, E, C]
        routed = slots * keep.unsqueeze(-1)
        dispatch = routed.sum(2).to(x.dtype)                            # [B, T, E, C]
        combine = torch.einsum("btkec,btk->btec", routed.to(x.dtype), top_p)
        expert_in = torch.einsum("btec,btd->ebcd", dispatch, x)          # [E, B, C, D]
        h = F.gelu(torch.einsum("ebcd,edf->ebcf", expert_in, self.w1) + self.b1[:, None, None, :])
        out = torch.einsum("ebcf,efd->ebcd", h, self.w2) + self.b2[:, None, None, :]
        return torch.einsum("btec,ebcd->btd", combine, out)


def ffn(layer: int) -> nn.Module:
    return MoE() if layer % 2 == 1 else FeedForward()


def model() -> nn.Module:
    return Bert(ffn=ffn)


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    return mlm_batch(7000 + step, batch_size)

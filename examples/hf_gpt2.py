"""HuggingFace transformers GPT-2 (``GPT2LMHeadModel``) built from a small config — no
weights are downloaded — wrapped in the spec protocol: forward(input_ids, targets)
returns the next-token cross-entropy computed from the logits. Dropout is 0 so
distributed training is exactly single-device training; attention is "sdpa".

Needs the optional extra: pip install -e '.[hf]' (transformers >= 5).

Environment variables:
  HAP_SIZE=paper     GPT-2 small: 12 layers, width 768, 12 heads, vocab 50257, seq 128;
                     default "tiny": 2 layers, width 32, 4 heads, vocab 128, seq 16
  HAP_BATCH=N        global batch (default: 8 tiny, 512 paper)
"""
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

PAPER = os.environ.get("HAP_SIZE", "tiny") == "paper"
LAYERS, DIM, HEADS, VOCAB, SEQ = (12, 768, 12, 50257, 128) if PAPER else (2, 32, 4, 128, 16)
BATCH_SIZE = int(os.environ.get("HAP_BATCH", "512" if PAPER else "8"))


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=DIM, n_layer=LAYERS, n_head=HEADS,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0,
                            eos_token_id=0, attn_implementation="sdpa")
        self.hf = GPT2LMHeadModel(config)  # initialised N(0, 0.02) by transformers

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.hf(input_ids=input_ids, use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def model() -> nn.Module:
    return LM()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(9000 + step)
    data = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()

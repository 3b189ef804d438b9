"""HuggingFace transformers Llama (``LlamaForCausalLM``) built from a small config — no
weights are downloaded — with RMSNorm, rotary position embeddings, SwiGLU and
grouped-query attention (fewer key/value heads than query heads), wrapped in the spec
protocol: forward(input_ids, targets) returns the next-token cross-entropy computed from
the logits. Attention is "sdpa".

Needs the optional extra: pip install -e '.[hf]' (transformers >= 5).

Environment variables:
  HAP_SIZE=paper     a Llama of BERT-Base scale: 12 layers, width 768, 12 query heads and
                     4 key/value heads, FFN 2048, vocab 32000, seq 128;
                     default "tiny": 2 layers, width 32, 4 query / 2 key-value heads, FFN 64,
                     vocab 128, seq 16
  HAP_BATCH=N        global batch (default: 8 tiny, 512 paper)
"""
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

PAPER = os.environ.get("HAP_SIZE", "tiny") == "paper"
if PAPER:
    LAYERS, DIM, HEADS, KV_HEADS, FFN, VOCAB, SEQ = 12, 768, 12, 4, 2048, 32000, 128
else:
    LAYERS, DIM, HEADS, KV_HEADS, FFN, VOCAB, SEQ = 2, 32, 4, 2, 64, 128, 16
BATCH_SIZE = int(os.environ.get("HAP_BATCH", "512" if PAPER else "8"))


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ,
                             attention_dropout=0.0, use_cache=False, attn_implementation="sdpa")
        self.hf = LlamaForCausalLM(config)  # initialised N(0, 0.02) by transformers

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.hf(input_ids=input_ids, use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def model() -> nn.Module:
    return LM()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(11000 + step)
    data = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()

"""HuggingFace transformers BERT (``BertForMaskedLM``) built from a small config — no
weights are downloaded — wrapped in the spec protocol: forward(input_ids,
attention_mask, labels) returns the masked-language-model cross-entropy computed from
the logits (labels -100 are ignored). Samples have random lengths and are padded; the
attention mask hides the padding. Dropout is 0; attention is "sdpa".

Needs the optional extra: pip install -e '.[hf]' (transformers >= 5).

Environment variables:
  HAP_SIZE=paper     BERT-Base: 12 layers, width 768, 12 heads, FFN 3072, vocab 30522, seq 128;
                     default "tiny": 2 layers, width 32, 4 heads, FFN 64, vocab 128, seq 16
  HAP_BATCH=N        global batch (default: 8 tiny, 512 paper)
"""
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM

PAPER = os.environ.get("HAP_SIZE", "tiny") == "paper"
LAYERS, DIM, HEADS, FFN, VOCAB, SEQ = (12, 768, 12, 3072, 30522, 128) if PAPER else (2, 32, 4, 64, 128, 16)
BATCH_SIZE = int(os.environ.get("HAP_BATCH", "512" if PAPER else "8"))
PAD_ID, MASK_ID, FIRST_WORD = 0, 1, 2


class MaskedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=FFN, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, pad_token_id=PAD_ID, attn_implementation="sdpa")
        self.hf = BertForMaskedLM(config)  # initialised N(0, 0.02) by transformers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.hf(input_ids=input_ids, attention_mask=attention_mask).logits
        return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)


def model() -> nn.Module:
    return MaskedLM()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(10000 + step)
    words = torch.randint(FIRST_WORD, VOCAB, (batch_size, SEQ), generator=g)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (batch_size, 1), generator=g)
    real = torch.arange(SEQ)[None, :] < lengths
    chosen = (torch.rand(batch_size, SEQ, generator=g) < 0.15) & real
    chosen[:, 0] = True
    input_ids = torch.where(chosen, torch.full_like(words, MASK_ID), words).masked_fill(~real, PAD_ID)
    labels = torch.where(chosen, words, torch.full_like(words, -100))
    return input_ids, real.long(), labels

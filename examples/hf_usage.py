"""HuggingFace transformers models used the way their documentation shows:
``model(input_ids=..., labels=...).loss`` (or ``pixel_values=``), each built from a
small config with the library's defaults (default ``attn_implementation``, default
``use_cache``); nothing is tuned for hap. Compare ``examples/hf_gpt2.py``, which
computes the loss from the logits itself.

Needs the optional extra: pip install -e '.[hf]' (transformers >= 5). No weights are
downloaded: every model is initialised from its config. Dropout is 0 so distributed
training is exactly single-device training.

Environment variables:
  HAP_HF_MODEL=gpt2|llama|qwen2_moe|olmoe|t5|bert|vit   which model (default gpt2):
      gpt2       GPT2LMHeadModel, causal LM (labels = input_ids, shifted inside the model)
      llama      LlamaForCausalLM, grouped-query attention, rotary embeddings
      qwen2_moe  Qwen2MoeForCausalLM: every block's FFN is 4 routed experts (top 2) beside a gated
                 shared expert; the experts run through transformers' grouped matmul custom op
      olmoe      OlmoeForCausalLM: 4 routed experts (top 2) per block, no shared expert
      t5     T5ForConditionalGeneration, encoder-decoder (decoder inputs made from labels)
      bert   BertForSequenceClassification, 3 classes
      vit    ViTForImageClassification on 16x16 images, 5 classes
  HAP_HF_SIZE=1b|8b|small               with llama: the shape of Llama-3.2-1B (16 blocks, width 2048,
                                        32/8 heads, FFN 8192, vocab 128256, tied embeddings) or of
                                        Llama-3-8B (32 blocks, width 4096, 32/8 heads, FFN 14336,
                                        vocab 128256), seq 2048, global batch 256: for planning (on
                                        the meta device), not for training here; small: 4 blocks,
                                        width 256, 8/4 heads, FFN 1024, vocab 8192, seq 512 (batch
                                        HAP_BATCH, default 12), to check memory and step predictions
  HAP_HF_SIZE=plan                      with qwen2_moe: Qwen2-MoE's shape (24 blocks, width 1024, 16 heads,
                                        expert FFN 2816, shared expert 5632, vocab 151936), seq 1024, global
                                        batch 1024 (16 per GPU of the 64-GPU HAP cluster), for planning
  HAP_HF_EXPERTS=E                      with qwen2_moe / olmoe: experts per block (default 4; 8 at size plan)
  HAP_BATCH=N                           global batch (default 12)
  HAP_HF_ROUTER_LOGITS=1                with qwen2_moe / olmoe: output_router_logits=True, so the loss
                                        adds the router's load-balancing loss (router_aux_loss_coef)
"""
import os

import torch
from torch import nn

MODEL = os.environ.get("HAP_HF_MODEL", "gpt2")
SIZE = os.environ.get("HAP_HF_SIZE", "tiny")
LLAMA = {"1b": (128256, 2048, 2048, 16, 32, 8192, 8, True), "8b": (128256, 2048, 4096, 32, 32, 14336, 8, False),
         "small": (8192, 512, 256, 4, 8, 1024, 4, False)}
# Qwen2-MoE's shape at planning size: 24 blocks, width 1024, 16 heads, experts of FFN 2816 (FFN // 2) beside a
# shared expert of 5632, vocab 151936, seq 1024
QWEN2_MOE = (151936, 1024, 1024, 24, 16, 5632, 16, False)
EXPERTS = int(os.environ.get("HAP_HF_EXPERTS", "8" if SIZE == "plan" else "4"))
if MODEL == "llama" and SIZE in LLAMA:
    VOCAB, SEQ, DIM, LAYERS, HEADS, FFN, KV_HEADS, TIED = LLAMA[SIZE]
elif MODEL == "qwen2_moe" and SIZE == "plan":
    VOCAB, SEQ, DIM, LAYERS, HEADS, FFN, KV_HEADS, TIED = QWEN2_MOE
else:
    VOCAB, SEQ, DIM, LAYERS, HEADS, FFN, KV_HEADS, TIED = 128, 16, 32, 2, 4, 64, 2, False
BATCH_SIZE = int(os.environ.get("HAP_BATCH", "256" if SIZE in ("1b", "8b") else "1024" if SIZE == "plan" else "12"))
CLASSES, IMAGE = {"bert": 3, "vit": 5}.get(MODEL, 0), 16


def hf_model() -> nn.Module:
    """The model as its documentation builds it: a config (library defaults) and a class."""
    import transformers as tf

    if MODEL == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=DIM, n_layer=LAYERS,
                                                n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                bos_token_id=0, eos_token_id=0))
    if MODEL == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN,
                                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                  num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ,
                                                  tie_word_embeddings=TIED,
                                                  # the planning shapes train without the KV cache, as HF's
                                                  # Trainer does; with it, export of the 1B shape holds ~6 GB
                                                  **({"use_cache": False} if SIZE in ("1b", "8b") else {})))
    if MODEL in ("qwen2_moe", "olmoe"):
        router = {"output_router_logits": os.environ.get("HAP_HF_ROUTER_LOGITS") == "1",
                  **({"use_cache": False} if SIZE == "plan" else {})}
        common = dict(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ, num_experts=EXPERTS,
                      num_experts_per_tok=2, **router)
        if MODEL == "qwen2_moe":
            return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(intermediate_size=FFN, moe_intermediate_size=FFN // 2,
                                                            shared_expert_intermediate_size=FFN, **common))
        return tf.OlmoeForCausalLM(tf.OlmoeConfig(intermediate_size=FFN // 2, eos_token_id=0, **common))
    if MODEL == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB, d_model=DIM, d_kv=DIM // HEADS,
                                                         d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
                                                         dropout_rate=0.0, decoder_start_token_id=0,
                                                         pad_token_id=0))
    if MODEL == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=SEQ, num_labels=CLASSES, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
    if MODEL == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(
            image_size=IMAGE, patch_size=4, num_channels=3, hidden_size=DIM, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, intermediate_size=FFN, num_labels=CLASSES, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
    raise ValueError(f"HAP_HF_MODEL={MODEL!r}: choose gpt2, llama, qwen2_moe, olmoe, t5, bert or vit")


class Documented(nn.Module):
    """forward(*batch) returns the loss the model computes from its documented keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.model = hf_model()

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if MODEL == "vit":
            return self.model(pixel_values=inputs, labels=labels).loss
        return self.model(input_ids=inputs, labels=labels).loss


def model() -> nn.Module:
    return Documented()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(13000 + step)
    if MODEL == "vit":
        return torch.randn(batch_size, 3, IMAGE, IMAGE, generator=g), torch.randint(0, CLASSES, (batch_size,),
                                                                                   generator=g)
    ids = torch.randint(1, VOCAB, (batch_size, SEQ), generator=g)
    if MODEL == "bert":
        return ids, torch.randint(0, CLASSES, (batch_size,), generator=g)
    if MODEL == "t5":  # a target sequence of its own; the model shifts it right for the decoder's input
        return ids, torch.randint(1, VOCAB, (batch_size, SEQ // 2), generator=g)
    return ids, ids.clone()  # causal LM: the labels are the inputs, the model shifts them

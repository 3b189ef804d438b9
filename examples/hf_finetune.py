"""Fine-tuning a pretrained HuggingFace model: GPT-2 from a local checkpoint directory, used as
documented (``model(input_ids=..., labels=...).loss``).

``PRETRAINED`` names the checkpoint directory (what ``save_pretrained`` or a download writes:
``config.json`` and ``model.safetensors``, or shards with ``model.safetensors.index.json``);
``PRETRAINED_PREFIX`` is where the HuggingFace model sits inside ``model()`` (here
``self.model``). ``model()`` builds the architecture from the directory's ``config.json``; the
program then loads the checkpoint's tensors, each rank reading only the slices it holds.

By default the directory is a small GPT-2 (2 blocks, width 64, vocab 512) that this spec saves
once with ``save_pretrained``, seeded and in shards of 100 kB, so nothing is downloaded. To
fine-tune a real checkpoint, download it and point ``HAP_PRETRAINED`` at it, e.g.

    huggingface-cli download openai-community/gpt2 --local-dir ~/models/gpt2
    HAP_PRETRAINED=~/models/gpt2 HAP_SEQ=128 hap-plan examples/hf_finetune.py --cluster ...

Environment variables:
  HAP_PRETRAINED=DIR   the checkpoint directory (default: the small GPT-2, saved under
                       ~/.cache/hap/pretrained/tiny-gpt2 on first use)
  HAP_SEQ=T            tokens per sample (default 16)
  HAP_BATCH=N          global batch (default 12)
"""
import functools
import os
from pathlib import Path

import torch
from torch import nn

TINY = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hap" / "pretrained" / "tiny-gpt2"
PRETRAINED = os.path.expanduser(os.environ.get("HAP_PRETRAINED", str(TINY)))
PRETRAINED_PREFIX = "model."
SEQ = int(os.environ.get("HAP_SEQ", "16"))
BATCH_SIZE = int(os.environ.get("HAP_BATCH", "12"))


def save_tiny(directory: Path) -> None:
    """The small GPT-2 checkpoint, written once (seeded, so every machine writes the same)."""
    import transformers as tf

    torch.manual_seed(1234)
    config = tf.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tf.GPT2LMHeadModel(config).save_pretrained(tmp, max_shard_size="100KB")
    try:
        tmp.rename(directory)  # whole or not at all: another process may have written it first
    except OSError:
        if not directory.is_dir():
            raise


@functools.cache
def config():
    """The checkpoint's config (the small GPT-2 saved first where it is the default and absent)."""
    import transformers as tf

    if PRETRAINED == str(TINY) and not TINY.is_dir():
        TINY.parent.mkdir(parents=True, exist_ok=True)
        save_tiny(TINY)
    return tf.AutoConfig.from_pretrained(PRETRAINED)


class Documented(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import transformers as tf

        self.model = tf.AutoModelForCausalLM.from_config(config())

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inputs, labels=labels).loss


def model() -> nn.Module:
    return Documented()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(17000 + step)
    ids = torch.randint(1, config().vocab_size, (batch_size, SEQ), generator=g)
    return ids, ids.clone()

"""Train on your data: a character-level GPT on text that ships with Python, in the dataset
form of the spec protocol (no download).

The text is the source of a fixed list of standard-library modules (this interpreter's copy),
as bytes clamped to 7-bit ASCII; the first 90% is the "train" split, the rest "val". An item
is a window of SEQ characters and the same window shifted by one (the targets). With
``HAP_DATA_URL`` set, the text is read from that URL instead (``s3://``, ``gs://``,
``https://``, ``file://``), downloaded once into hap's local cache through fsspec
(``hap.runtime.data.open_url``).

    hap-plan examples/chargpt.py --precision auto --emit out --force
    torchrun --standalone --nproc-per-node 2 out/train.py --steps 300 --optimizer adam --lr 3e-3 --eval-every 50

Environment variables: HAP_CHAR_SEQ (default 64), HAP_CHAR_BATCH (32), HAP_CHAR_DIM (128),
HAP_CHAR_LAYERS (2), HAP_DATA_URL.
"""
import os
import sysconfig

import torch
from gpt import GPT
from torch.utils.data import Dataset

SEQ = int(os.environ.get("HAP_CHAR_SEQ", "64"))
BATCH_SIZE = int(os.environ.get("HAP_CHAR_BATCH", "32"))
DIM = int(os.environ.get("HAP_CHAR_DIM", "128"))
LAYERS = int(os.environ.get("HAP_CHAR_LAYERS", "2"))
VOCAB = 128
MODULES = ("argparse.py", "textwrap.py", "difflib.py", "string.py", "heapq.py", "bisect.py", "functools.py",
           "json/decoder.py", "json/encoder.py", "csv.py", "fractions.py", "shlex.py")
TRAIN_FRACTION = 0.9


def text() -> bytes:
    url = os.environ.get("HAP_DATA_URL")
    if url:
        from hap.runtime.data import open_url

        with open_url(url) as f:
            return f.read()
    lib = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in MODULES:
        with open(os.path.join(lib, name), "rb") as f:
            parts.append(f.read())
    return b"\n".join(parts)


class Characters(Dataset):
    """Non-overlapping windows of SEQ + 1 characters of one split."""

    def __init__(self, split: str) -> None:
        data = torch.frombuffer(bytearray(text()), dtype=torch.uint8).clamp(max=VOCAB - 1).long()
        cut = int(len(data) * TRAIN_FRACTION)
        self.data = data[:cut] if split == "train" else data[cut:]

    def __len__(self) -> int:
        return (len(self.data) - 1) // SEQ

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[i * SEQ:i * SEQ + SEQ + 1]
        return chunk[:-1], chunk[1:]


def model() -> torch.nn.Module:
    return GPT(vocab=VOCAB, seq=SEQ, dim=DIM, layers=LAYERS, heads=4)


def dataset(split: str) -> Dataset:
    return Characters(split)

"""A DLRM-style recommender (Naumov et al. 2019): dense features through a bottom MLP,
sparse features through embedding-bag tables (mode "sum", bags given by offsets), the
pairwise dot products of all feature vectors (bmm, then the strictly upper triangle
picked by a fixed index), a top MLP over [dense, interactions], and a binary
cross-entropy loss on the click logit.

The batch is (dense [B, DENSE], sparse [B, TABLES, BAG], clicks [B]): every sample has
one bag of up to BAG ids per table, padded with id 0 (each table's padding_idx, excluded
from the sum), so bags have variable length; the model flattens each table's ids and
passes the bag offsets (0, BAG, 2*BAG, ...) to nn.EmbeddingBag.

Environment variables:
  HAP_SIZE=paper     Criteo-Terabyte-like shapes: 26 tables of dim 64, bottom MLP
                     13-512-256-64, top MLP 415-512-512-256-1, bags of up to 4 ids;
                     default "tiny": 3 tables of dim 8 (50/40/30 rows), bottom 13-16-8, top 14-16-1
  HAP_DLRM_ROWS=N    rows of every table at paper size (default 100000; Criteo's largest
                     tables have tens of millions of rows)
  HAP_BATCH=N        global batch (default: 8 tiny, 2048 paper)
"""
import itertools
import os

import torch
import torch.nn.functional as F
from torch import nn

PAPER = os.environ.get("HAP_SIZE", "tiny") == "paper"
DENSE = 13
if PAPER:
    ROWS = [int(os.environ.get("HAP_DLRM_ROWS", "100000"))] * 26
    EMB, BOTTOM, TOP, BAG = 64, [512, 256, 64], [512, 512, 256], 4
else:
    ROWS, EMB, BOTTOM, TOP, BAG = [50, 40, 30], 8, [16, 8], [16], 4
TABLES = len(ROWS)
FEATURES = TABLES + 1
PAIRS = FEATURES * (FEATURES - 1) // 2
BATCH_SIZE = int(os.environ.get("HAP_BATCH", "2048" if PAPER else "8"))


def mlp(sizes: list[int], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        assert BOTTOM[-1] == EMB, "the bottom MLP must end at the embedding dim"
        self.bottom = mlp([DENSE, *BOTTOM], last_relu=True)
        self.tables = nn.ModuleList(nn.EmbeddingBag(n, EMB, mode="sum", padding_idx=0) for n in ROWS)
        self.top = mlp([EMB + PAIRS, *TOP, 1], last_relu=False)
        upper = torch.triu(torch.ones(FEATURES, FEATURES, dtype=torch.bool), diagonal=1).flatten()
        self.register_buffer("pair_index", upper.nonzero().flatten())
        for m in self.modules():  # as the reference DLRM: N(0, sqrt(2/(fan_in+fan_out))), tables U(±1/sqrt(n))
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, (2 / (m.in_features + m.out_features)) ** 0.5)
                nn.init.normal_(m.bias, 0, (1 / m.out_features) ** 0.5)
            elif isinstance(m, nn.EmbeddingBag):
                nn.init.uniform_(m.weight, -(1 / m.num_embeddings) ** 0.5, (1 / m.num_embeddings) ** 0.5)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
        b = dense.shape[0]
        x = self.bottom(dense)  # [B, EMB]
        offsets = torch.arange(0, b * BAG, BAG, device=dense.device)  # bag i starts at i * BAG
        feats = [x] + [t(sparse[:, i].reshape(-1), offsets) for i, t in enumerate(self.tables)]
        z = torch.stack(feats, dim=1)  # [B, FEATURES, EMB]
        dots = torch.bmm(z, z.transpose(1, 2)).flatten(1)  # [B, FEATURES * FEATURES]
        pairs = dots.index_select(1, self.pair_index)  # [B, PAIRS]: the strictly upper triangle
        logit = self.top(torch.cat([x, pairs], dim=1)).squeeze(1)
        return F.binary_cross_entropy_with_logits(logit, clicks)


def model() -> nn.Module:
    return DLRM()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(8000 + step)
    dense = torch.rand(batch_size, DENSE, generator=g).log1p()  # Criteo-like log-scaled counts
    rows = torch.tensor(ROWS)[None, :, None]
    ids = 1 + (torch.rand(batch_size, TABLES, BAG, generator=g) * (rows - 1)).long()
    length = torch.randint(1, BAG + 1, (batch_size, TABLES, 1), generator=g)
    sparse = ids.masked_fill(torch.arange(BAG)[None, None, :] >= length, 0)  # pad with id 0
    clicks = (torch.rand(batch_size, generator=g) < 0.3).float()
    return dense, sparse, clicks

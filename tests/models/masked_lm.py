"""A small language model whose targets are partly ignored (-100, as padding and prompt tokens
are in real fine-tuning), a different number in every sample: the mean cross-entropy divides
by the count of kept targets in the whole global batch, which no micro-batch knows alone."""
import torch
from torch import nn

BATCH_SIZE = 96
VOCAB, T, D = 64, 16, 64


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.body = nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens, targets):
        h = self.emb(tokens)
        logits = self.head(h + self.body(h))
        return nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def model():
    return LM()


def batch(step, batch_size):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (batch_size, T), generator=g)
    targets = torch.randint(0, VOCAB, (batch_size, T), generator=g)
    kept = torch.randint(1, T + 1, (batch_size, 1), generator=g)  # each sample keeps its last `kept` targets
    targets[torch.arange(T).expand(batch_size, T) < T - kept] = -100
    return tokens, targets

"""A language model whose vocabulary is wide against its batch (65536 classes, width 8): on the
rank with the largest share its logits are more than ``hap.runtime.chunked_loss.CHUNKED_ABOVE``
and the loss runs in chunks of rows; on the others it runs whole. Some targets are ignored."""
import torch
from torch import nn

BATCH_SIZE = 48
VOCAB, T, D = 65536, 64, 8


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, tokens, targets):
        logits = self.head(torch.tanh(self.mix(self.emb(tokens))))
        return nn.functional.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1))


def model():
    return LM()


def batch(step, batch_size):
    g = torch.Generator().manual_seed(2000 + step)
    tokens = torch.randint(0, VOCAB, (batch_size, T), generator=g)
    targets = torch.randint(0, VOCAB, (batch_size, T), generator=g)
    targets[:, : T // 4] = -100  # a prompt whose tokens are not predicted
    return tokens, targets

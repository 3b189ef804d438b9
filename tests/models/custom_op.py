"""An MLP whose activation is a custom operator of its own, registered with torch.library
(``haptest::shifted_softplus``, with a fake kernel and an autograd formula): train.py must call
it through torch.ops, the op having no sharding rule, so it runs replicated."""
import torch
from torch import nn

BATCH_SIZE = 24
D, H = 16, 32


@torch.library.custom_op("haptest::shifted_softplus", mutates_args=())
def shifted_softplus(x: torch.Tensor, shift: float) -> torch.Tensor:
    return torch.log1p(torch.exp(x)) - shift


@shifted_softplus.register_fake
def _(x, shift):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * torch.sigmoid(x), None


shifted_softplus.register_autograd(_backward, setup_context=_setup)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.out = nn.Linear(D, H), nn.Linear(H, 4)

    def forward(self, x, y):
        h = torch.ops.haptest.shifted_softplus(self.fc1(x), 0.5)
        return nn.functional.mse_loss(self.out(h), y)


def model():
    return Net()


def batch(step, batch_size):
    g = torch.Generator().manual_seed(step)
    return torch.randn(batch_size, D, generator=g), torch.randn(batch_size, 4, generator=g)

"""Expert parallelism for transformers' experts modules: each rank holds a contiguous range of the
experts (``lengths``, uneven: a faster rank holds more) and computes them for every rank's tokens.

``experts_parallel`` computes what the module's grouped-matmul path computes for this rank's
tokens: every (token, choice) pair goes through its expert (``act(x @ gate.T) * (x @ up.T)``,
then ``@ down.T``), is weighted by its routing weight, and the ``top_k`` pairs of a token are
summed in choice order. Here a pair is sent to the rank that holds its expert (one uneven
``all_to_all``), the owner runs its experts over the rows it received, grouped by expert with
the same grouped matmul as the single-device program, and sends the results back (a second
``all_to_all``); backward sends the gradients the other way. No token is dropped: routing is
the model's, unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import dist as _d
from .shares import offset

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "relu": F.relu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _exchange_rows(x: torch.Tensor, send: Sequence[int], recv: Sequence[int]) -> torch.Tensor:
    """Rows of ``x`` (grouped by destination rank, ``send[j]`` for rank j) to their ranks; returns
    the rows received (``recv[i]`` from rank i, in rank order)."""
    row = x[0].numel() if x.dim() > 1 else 1
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    if _d.world_size() > 1:
        _d._all_to_all(out.view(-1), x.contiguous().view(-1), [r * row for r in recv], [s * row for s in send])
    else:
        out.copy_(x)
    return out


class _Exchange(torch.autograd.Function):
    """``_exchange_rows`` with its backward: the gradients of the rows go back where they came from."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        ctx.send, ctx.recv = send, recv
        return _exchange_rows(x, send, recv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange_rows(grad, ctx.recv, ctx.send), None, None


def _counts(owner: torch.Tensor, world: int) -> tuple[list[int], list[int]]:
    """(rows this rank sends to each rank, rows it receives from each): one all_to_all of counts."""
    send = torch.bincount(owner, minlength=world).to(torch.int64)
    recv = torch.empty_like(send)
    if world > 1:
        _d._all_to_all(recv, send, None, None)
    else:
        recv.copy_(send)
    return send.tolist(), recv.tolist()


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``perm``."""
    out = torch.empty_like(perm)
    out[perm] = torch.arange(perm.numel(), device=perm.device)
    return out


def experts_parallel(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     gate_up: torch.Tensor, down: torch.Tensor, lengths: Sequence[int], act: str,
                     grouped_mm: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The experts' output for this rank's tokens ``hidden`` [tokens, hidden]; ``top_k_index`` and
    ``top_k_weights`` [tokens, k] are their routing; ``gate_up`` [own experts, 2 x ffn, hidden] and
    ``down`` [own experts, hidden, ffn] are this rank's experts, rank r holding ``lengths[r]``
    experts after those of the ranks before it; ``grouped_mm(rows, weight [e, in, out], offsets)``
    is the single-device program's grouped matmul."""
    world, rank = len(lengths), _d.rank() if _d.world_size() > 1 else 0
    tokens, k = top_k_index.shape
    first = torch.tensor([offset(lengths, r) for r in range(world)], dtype=torch.int64, device=hidden.device)
    expert = top_k_index.reshape(-1)  # (token, choice) pairs, token-major as the module orders them
    owner = torch.searchsorted(first, expert, right=True) - 1
    order = torch.sort(owner, stable=True).indices  # pairs grouped by the rank that holds their expert
    send, recv = _counts(owner, world)
    rows = _Exchange.apply(hidden[order // k], send, recv)
    local = _exchange_rows((expert[order] - first[owner[order]]).contiguous(), send, recv)
    # the owner's rows grouped by its own experts, as the module's sort groups them
    by_expert, perm = torch.sort(local, stable=True)
    counts = torch.bincount(by_expert, minlength=lengths[rank])
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    x = rows[perm].to(gate_up.dtype)
    gate, up = grouped_mm(x, gate_up.transpose(-2, -1), offsets).chunk(2, dim=-1)
    out = grouped_mm(ACTIVATIONS[act](gate) * up, down.transpose(-2, -1), offsets)
    returned = _Exchange.apply(out[_inverse(perm)], recv, send)  # each pair's result, in the order it was sent
    weighted = returned[_inverse(order)] * top_k_weights.reshape(-1, 1)
    return weighted.view(tokens, k, -1).sum(dim=1).to(hidden.dtype)

"""Convolution and pooling: shard the batch, the output channels (column parallel) or the
input channels (partial sums, bias added once)."""
from __future__ import annotations

from hap.graph import Node
from hap.rules import Candidate, P, R, RuleContext, S, arg, rule


def _channel_units(ctx: RuleContext, channels: int) -> list[int]:
    """Units to shard conv channels in: channels are never the batch, even when their count
    happens to equal the global batch (so no rank gets 0 of them)."""
    return ctx.shard_units(channels, may_be_batch=False)


@rule("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default")
def conv(node: Node, ctx: RuleContext) -> list[Candidate]:
    refs = node.inputs()
    x, w = ctx.meta(refs[0]), ctx.meta(refs[1])
    has_bias = len(refs) > 2
    groups = arg(node, 6, "groups", 1)
    unbatched = x.ndim == w.ndim - 1
    cands = []
    if not unbatched:
        for u in ctx.shard_units(x.shape[0]):
            name = "batch:S(0)" if u == 1 else f"batch:S(0/{u})"
            cands.append(Candidate(name, (S(0, u), R) + ((R,) if has_bias else ()), S(0, u), split=(x.shape[0], u)))
    if groups == 1 and not unbatched:
        for u in _channel_units(ctx, w.shape[0]):
            cands.append(Candidate("out:S(1)" if u == 1 else f"out:S(1/{u})",
                                   (R, S(0, u)) + ((S(0, u),) if has_bias else ()), S(1, u), split=(w.shape[0], u)))
        for u in _channel_units(ctx, w.shape[1]):
            cands.append(Candidate("in:P" if u == 1 else f"in/{u}:P",
                                   (S(1, u), S(1, u)) + ((P,) if has_bias else ()), P, split=(w.shape[1], u)))
    return cands


@rule("aten.max_pool2d.default", "aten.avg_pool2d.default", "aten.adaptive_avg_pool2d.default",
      "aten.max_pool1d.default", "aten.avg_pool1d.default", "aten.adaptive_avg_pool1d.default",
      "aten.max_pool3d.default", "aten.avg_pool3d.default", "aten.adaptive_max_pool2d.default",
      "aten.upsample_nearest2d.vec", "aten.pixel_shuffle.default")
def pool(node: Node, ctx: RuleContext) -> list[Candidate]:
    x = ctx.meta(node.inputs()[0])
    spatial = {"1d": 1, "2d": 2, "3d": 3}
    k = next((v for s, v in spatial.items() if s in node.target), 2)
    cands = []
    for d in range(x.ndim - k):
        if "pixel_shuffle" in node.target and d == x.ndim - 3:
            continue
        for u in ctx.shard_units(x.shape[d]) if d == 0 else _channel_units(ctx, x.shape[d]):
            cands.append(Candidate(f"S({d})" if u == 1 else f"S({d}/{u})", (S(d, u),), S(d, u), split=(x.shape[d], u)))
    if "avg" in node.target:
        cands.append(Candidate("P", (P,), P))
    return cands

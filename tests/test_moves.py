"""The one transition table: what each placement change runs forward and in backward, and
that the emitted line and the timed call are the same hap.runtime call."""
from __future__ import annotations

import pytest
import torch

import hap.runtime as hr
from hap.moves import move
from hap.placement import P, R, S

TABLE = {  # (src, dst): (forward, backward)
    (R, S(0)): ("slice", "none"),
    (R, P): ("partial", "none"),
    (S(0), R): ("all_gather", "reduce_scatter"),
    (S(0), P): ("all_gather", "reduce_scatter"),
    (S(0), S(1)): ("all_to_all", "all_to_all"),
    (S(1), S(1, 4)): ("all_to_all", "all_to_all"),
    (P, R): ("all_reduce", "all_reduce"),
    (P, S(1)): ("reduce_scatter", "all_gather"),
    (S(1), S(1)): ("none", "none"),
}


@pytest.mark.parametrize("src,dst", list(TABLE), ids=[f"{a}->{b}" for a, b in TABLE])
def test_the_table(src, dst):
    mv = move(src, dst)
    assert (mv.kind, mv.backward) == TABLE[src, dst]
    assert mv.is_collective == (mv.kind not in ("none", "slice", "partial"))
    # uneven shards: every collective but the all-reduce comes padded or grouped
    assert mv.forms == (("padded", "grouped") if mv.kind in ("all_gather", "reduce_scatter", "all_to_all")
                        else ("",))


@pytest.mark.parametrize("src,dst", [k for k in TABLE if move(*k).kind != "none"],
                         ids=[f"{a}->{b}" for a, b in TABLE if move(a, b).kind != "none"])
def test_emitted_line_and_timed_call_agree(src, dst):
    """On one process every collective is the identity on the whole tensor: the line train.py
    contains and the call the op timer runs give the same tensor."""
    x = torch.randn(4, 6)
    shard = {0: (0, (4,)), 1: (1, (6,))}
    s = shard[src.dim] if src.is_shard else None
    d = shard[dst.dim] if dst.is_shard else None
    mv = move(src, dst)
    line = mv.code("x", s, d, "grouped" if mv.forms != ("",) else "")
    assert line.startswith("hr.") and line.count("x") >= 1
    fn = line[3:line.index("(")]
    assert callable(getattr(hr, fn)), fn
    emitted = eval(line, {"hr": hr, "x": x})  # noqa: S307 - the line hap writes into train.py
    timed = mv.apply(x, s, d, "grouped" if mv.forms != ("",) else "")
    assert torch.equal(emitted, timed)
    assert torch.equal(timed, x)


def test_the_cost_model_prices_the_dual_in_backward():
    """A gradient-carrying all-gather costs its forward plus the reduce-scatter of the same bytes."""
    from hap.cluster import load_cluster
    from hap.cost import _wire_price
    from hap.graph import Graph, Node, TensorMeta
    from hap.machine import collective_s
    from hap.placement import Splitter

    meta = TensorMeta((64, 256), "float32")
    graph = Graph([Node("x", "input", "0", meta=meta)], "x", 1)
    cluster = load_cluster("cpu-1-2-4")
    from hap.cost import CostModel

    cm = CostModel(graph, cluster, Splitter((4, 2, 1)))
    fwd = _wire_price(cm, meta, S(0), R, grad=False)
    both = _wire_price(cm, meta, S(0), R, grad=True)
    fr = cm._fr(meta, S(0))
    back = collective_s("reduce_scatter", meta.nbytes, fr, cm.link, fwd.form)
    assert fwd.kind == "all_gather" and fwd.seconds > 0
    assert both.seconds == pytest.approx(fwd.seconds + back)


@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter", "all_to_all"])
@pytest.mark.parametrize("form", ["padded", "grouped"])
@pytest.mark.parametrize("lengths", [(6, 2), (5, 3, 0, 4), (1, 1, 10)])
def test_the_bytes_charged_are_the_bytes_the_implementation_moves(monkeypatch, kind, form, lengths):
    """For every rank, the bytes hap.runtime hands the backend to send and to receive (its own
    share excluded); the cost model charges the busiest rank's (hap.machine.wire_bytes)."""
    from hap.machine import wire_bytes
    from hap.runtime import dist as hd

    n, cols, elem = len(lengths), 3, 4  # fp32 tensors of sum(lengths) x 3
    total = sum(lengths) * cols * elem
    fr = tuple(v / sum(lengths) for v in lengths)
    dst_lengths = tuple(reversed(lengths))  # all-to-all: rows -> columns of another split
    busiest = 0.0
    for r in range(n):
        moved = {"send": 0, "recv": 0}

        def count(size, splits_send, splits_recv, r=r, moved=moved):
            moved["send"] += sum(s for i, s in enumerate(splits_send) if i != r) * size
            moved["recv"] += sum(s for i, s in enumerate(splits_recv) if i != r) * size

        monkeypatch.setattr(hd, "_all_gather_equal", lambda out, inp, async_op=False, r=r: count(
            inp.element_size(), [inp.numel()] * n, [inp.numel()] * n))
        monkeypatch.setattr(hd, "_reduce_scatter_equal", lambda out, inp, async_op=False, r=r: count(
            inp.element_size(), [out.numel()] * n, [out.numel()] * n))
        monkeypatch.setattr(hd, "_all_to_all", lambda out, inp, os_, is_, async_op=False, r=r: count(
            inp.element_size(), is_ or [inp.numel() // n] * n, os_ or [out.numel() // n] * n))
        with hd.local_work_only(r, n):
            if kind == "all_gather":
                hr.all_gather(torch.ones(lengths[r], cols), 0, lengths, form=form)
            elif kind == "reduce_scatter":
                hr.reduce_scatter(torch.ones(sum(lengths), cols), 0, lengths, form=form)
            else:
                x = torch.ones(lengths[r], sum(dst_lengths))
                hr.all_to_all(x, 0, lengths, 1, dst_lengths, form=form)
        busiest = max(busiest, moved["send"], moved["recv"])
    if kind == "all_to_all":
        total = sum(lengths) * sum(dst_lengths) * elem
        want = wire_bytes(kind, total, fr, form, tuple(v / sum(dst_lengths) for v in dst_lengths))
    else:
        want = wire_bytes(kind, total, fr, form)
    assert busiest == pytest.approx(want, rel=1e-9), (busiest, want)

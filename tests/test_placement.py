"""Property tests: integer shares and per-rank lengths, placements' text form, view maps."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hap.placement import P, R, S, Splitter, parse
from hap.rules.shape import view_map
from hap.runtime.shares import largest_remainder


@given(st.integers(0, 10_000), st.lists(st.floats(0.01, 100), min_size=1, max_size=64))
def test_largest_remainder_splits_exactly_and_fairly(total, ratios):
    parts = largest_remainder(total, ratios)
    assert sum(parts) == total and min(parts) >= 0
    s = sum(ratios)
    for p, r in zip(parts, ratios):
        assert abs(p - total * r / s) < 1 + 1e-9


@given(st.lists(st.integers(0, 50), min_size=1, max_size=16).filter(lambda xs: sum(xs) > 0),
       st.integers(1, 5000), st.sampled_from([1, 2, 4, 8, 64]))
def test_lengths_sum_to_the_dim_in_whole_units(shares, blocks, unit):
    sp = Splitter(tuple(shares))
    size = blocks * unit
    ls = sp.lengths(size, unit)
    assert sum(ls) == size and all(x % unit == 0 and x >= 0 for x in ls)
    assert sp.lengths(sum(shares)) == tuple(shares)  # the batch dim gets exactly the shares


@given(st.sampled_from(["R", "P", "S(0)", "S(3)", "S(2/64)", "S(-1)"]))
def test_placement_text_round_trip(text):
    assert str(parse(text)) == text
    assert parse(str(R)) == R and parse(str(P)) == P and parse("S(1/4)") == S(1, 4)


@settings(max_examples=200)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.data())
def test_view_map_keeps_every_ranks_elements(dims, data):
    """Sharding S(d/u) before a view and S(o/u2) after it select the same flat elements."""
    src = tuple(dims)
    n = math.prod(src)
    # merge a random run of dims, or split one dim into two factors
    if len(src) > 1 and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(src) - 2))
        dst = src[:i] + (src[i] * src[i + 1],) + src[i + 2:]
    else:
        i = data.draw(st.integers(0, len(src) - 1))
        f = [k for k in range(1, src[i] + 1) if src[i] % k == 0]
        a = data.draw(st.sampled_from(f))
        dst = src[:i] + (a, src[i] // a) + src[i + 1:]
    d = data.draw(st.integers(0, len(src) - 1))
    shares = tuple(data.draw(st.lists(st.integers(0, 4), min_size=2, max_size=3).filter(lambda x: sum(x) > 0)))
    sp = Splitter(shares)
    m = view_map(src, dst, d, 1)
    if m is None:
        return
    o, u2 = m
    x = torch.arange(n).reshape(src)
    y = x.reshape(dst)
    ls, ls2 = sp.lengths(src[d]), sp.lengths(dst[o], u2)
    for r in range(len(shares)):
        local_dst = list(dst)
        local_dst[o] = ls2[r]
        a = x.narrow(d, sum(ls[:r]), ls[r]).reshape(local_dst)  # what the emitted local view computes
        b = y.narrow(o, sum(ls2[:r]), ls2[r])
        assert torch.equal(a, b), (src, dst, d, o, u2, shares)

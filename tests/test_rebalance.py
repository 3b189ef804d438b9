"""Re-balancing decisions (hap.runtime.shares.Rebalancer): a rank measured slower gets fewer
samples, noise within the minimum gain changes nothing, and a change waits out its cooldown."""
from __future__ import annotations

from hap.runtime.shares import COOLDOWN, WINDOW, Rebalancer, split_lengths


def test_a_rank_that_slows_gives_samples_to_the_others():
    rb = Rebalancer((768, 256))
    for _ in range(COOLDOWN):  # both ranks take 100 ms: the plan was right
        assert rb.observe((0.100, 0.100)) is None
    decided = None
    for _ in range(WINDOW):  # rank 0 now takes 4x as long per sample
        decided = rb.observe((0.400, 0.100)) or decided
    assert decided is not None
    shares, reason = decided
    assert sum(shares) == 1024 and shares[0] < 768 and "predicted to fall" in reason
    # rank 0: 0.4 s / 768 samples, rank 1: 0.1 s / 256: speeds 1920 : 2560 samples/s
    assert abs(shares[0] - 1024 * 1920 / (1920 + 2560)) <= 1


def test_noise_within_the_minimum_gain_changes_nothing_and_changes_wait_for_the_cooldown():
    rb = Rebalancer((512, 512))
    for step in range(20):
        jitter = 0.004 if step % 2 else -0.004
        assert rb.observe((0.100 + jitter, 0.100 - jitter)) is None
    rb = Rebalancer((512, 512))
    first = [rb.observe((0.300, 0.100)) for _ in range(COOLDOWN)]
    assert first[-1] is not None and not any(first[:-1])
    assert all(rb.observe((0.300, 0.100)) is None for _ in range(COOLDOWN - 1))


def test_lengths_follow_the_shares_with_the_planner_rule():
    from hap.placement import Splitter

    for shares in ((12, 4), (5, 11), (7, 0, 9)):
        for size, unit in ((16, 1), (512, 32), (100, 1), (16 * 3, 3)):
            assert split_lengths(size, unit, shares) == Splitter(shares).lengths(size, unit)


def test_work_that_does_not_follow_the_share_stops_the_shares_from_running_away():
    # rank 0 takes 6 ms whatever its share (launch costs of small ops), rank 1 0.05 ms a sample:
    # the first change believes compute is proportional to the share; once both points are
    # measured the line through them shows that no further move pays
    rb = Rebalancer((32, 32))
    cost = [lambda s: 0.006 + 1e-6 * s, lambda s: 5e-5 * s]
    changes = []
    for _ in range(40):
        decided = rb.observe(tuple(cost[r](rb.shares[r]) for r in range(2)))
        if decided:
            changes.append(decided[0])
    assert len(changes) == 1, changes
    assert changes[0][0] < 32


def test_balanced_shares_equalise_affine_compute():
    from hap.runtime.shares import balanced

    # a + b x share: rank 0 has 10 ms of fixed work, both 1 ms a sample: rank 1 takes 10 more
    assert balanced(100, [(0.010, 0.001), (0.0, 0.001)]) == (45, 55)
    assert balanced(100, [(0.0, 0.001), (0.0, 0.003)]) == (75, 25)
    assert balanced(100, [(0.0, 0.0), (0.0, 0.001)]) is None  # no rate: no proposal


def test_speeds_that_move_far_apart_suggest_a_new_plan():
    rb = Rebalancer((512, 512))
    for _ in range(COOLDOWN):
        rb.observe((0.100, 0.100))
    assert rb.replan_hint() is None
    decided = None
    for _ in range(WINDOW):  # rank 0 turns 3x slower: shares move, and a new plan is suggested
        decided = rb.observe((0.300, 0.100)) or decided
    assert decided is not None
    hint = rb.replan_hint()
    assert hint and hint.startswith("rank 0 computes 3.0x slower")

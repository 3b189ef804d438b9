"""Batch shares and the lengths they give every sharded dim, and re-balancing them while a
program runs (no solver: a closed form).

``split_lengths`` is the one rule for per-rank lengths (the planner's ``hap.placement.Splitter``
uses it too): a dim of the global batch size gets exactly the shares; any other dim of ``n``
blocks is split in the same ratio by largest remainder.

``Rebalancer`` watches each rank's measured compute per step (forward + backward, the emulated
slowdown included; not wall time, which a fast rank spends waiting in collectives). When the
shares proportional to the measured speeds would shorten the slowest rank's compute by at
least ``MIN_GAIN``, measured over ``WINDOW`` steps, and the last change is ``COOLDOWN`` steps
back, it proposes them. Every rank sees the same all-reduced measurements and so takes the
same decision. The global batch never changes, so training stays what it was.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

WINDOW = 3  # steps of measurements a decision is based on
MIN_GAIN = 0.10  # the predicted slowest compute must fall by at least this fraction
COOLDOWN = 4  # steps after a change before the next (its first steps are measured afresh)


def largest_remainder(total: int, ratios: Sequence[float]) -> tuple[int, ...]:
    """Integer parts of ``total`` proportional to ``ratios`` that sum to ``total``.

    Floors first, then the remainder goes to the largest fractional parts (ties to the
    lower rank), as HAP does; a zero ratio gets zero.
    """
    s = float(sum(ratios))
    if not s > 0 or total < 0:
        raise ValueError(f"largest_remainder({total}, {list(ratios)}): needs ratios with a positive sum")
    exact = [total * r / s for r in ratios]
    parts = [int(x) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return tuple(parts)


def split_lengths(size: int, unit: int, shares: Sequence[int]) -> tuple[int, ...]:
    """Per-rank lengths of a dim of ``size`` elements (in blocks of ``unit``) under ``shares``."""
    blocks, total = size // unit, sum(shares)
    if blocks == total:
        return tuple(unit * s for s in shares)
    if total == 0:
        return (size,) + (0,) * (len(shares) - 1)
    return tuple(unit * b for b in largest_remainder(blocks, shares))


class Rebalancer:
    def __init__(self, shares: Sequence[int]) -> None:
        self.shares = tuple(shares)
        self.history: list[tuple[float, ...]] = []  # per step: every rank's compute seconds
        self.since_change = 0

    def observe(self, compute_s: Sequence[float]) -> tuple[tuple[int, ...], str] | None:
        """Record one step's per-rank compute; returns (new shares, reason) when re-balancing pays."""
        self.history.append(tuple(compute_s))
        self.since_change += 1
        if self.since_change < max(WINDOW, COOLDOWN) or len(self.history) < WINDOW:
            return None
        recent = self.history[-WINDOW:]
        per_rank = [statistics.median(step[r] for step in recent) for r in range(len(self.shares))]
        # seconds per sample of each rank; a rank with no samples keeps its last known rate
        rate = [c / s if s else None for c, s in zip(per_rank, self.shares)]
        known = [x for x in rate if x]
        if not known:
            return None
        rate = [x if x else min(known) for x in rate]
        speed = [1.0 / x for x in rate]
        proposal = largest_remainder(sum(self.shares), speed)
        now = max(c for c, s in zip(per_rank, self.shares) if s) if any(self.shares) else 0.0
        then = max(s * x for s, x in zip(proposal, rate))
        if proposal == self.shares or now <= 0 or then > now * (1 - MIN_GAIN):
            return None
        reason = (f"measured compute per step {', '.join(f'{c * 1e3:.1f}' for c in per_rank)} ms "
                  f"(median of {WINDOW} steps); the slowest rank's {now * 1e3:.1f} ms is predicted to fall to "
                  f"{then * 1e3:.1f} ms")
        self.shares = proposal
        self.since_change = 0
        return proposal, reason

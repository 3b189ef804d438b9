"""Batch shares and the lengths they give every sharded dim, and re-balancing them while a
program runs (no solver: a closed form).

``split_lengths`` is the one rule for per-rank lengths (the planner's ``hap.placement.Splitter``
uses it too): a dim of the global batch size gets exactly the shares; any other dim of ``n``
blocks is split in the same ratio by largest remainder.

``Rebalancer`` watches each rank's measured compute per step (forward + backward, the emulated
slowdown included; not the time spent in collectives, where a fast rank waits for the slow
ones). It models each rank's compute as proportional to its share, and after a change as the
line through the rank's last two shares (work that does not follow the share, such as small
ops' launch costs, then stops the shares from running away). When the shares that equalise
the modelled compute would shorten the slowest rank's by at least ``MIN_GAIN``, measured over
``WINDOW`` steps, and the last change is ``COOLDOWN`` steps back, it proposes them. Every
rank sees the same all-reduced measurements and so takes the same decision. The global batch
never changes, so training stays what it was.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

WINDOW = 3  # steps of measurements a decision is based on
MIN_GAIN = 0.10  # the predicted slowest compute must fall by at least this fraction
COOLDOWN = 4  # steps after a change before the next (its first steps are measured afresh)
REPLAN_DRIFT = 2.0  # speeds this far apart from the run's start: suggest a new plan


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


def offset(lengths: Sequence[int], rank: int) -> int:
    """Where ``rank``'s slice of a dim cut into per-rank ``lengths`` begins: ranks hold
    consecutive slices in rank order."""
    return sum(lengths[:rank])


def split_lengths(size: int, unit: int, shares: Sequence[int]) -> tuple[int, ...]:
    """Per-rank lengths of a dim of ``size`` elements (in blocks of ``unit``) under ``shares``."""
    blocks, total = size // unit, sum(shares)
    if blocks == total:
        return tuple(unit * s for s in shares)
    if total == 0:
        return (size,) + (0,) * (len(shares) - 1)
    return tuple(unit * b for b in largest_remainder(blocks, shares))


class Rebalancer:
    def __init__(self, shares: Sequence[int], allowed: Callable[[tuple[int, ...]], bool] | None = None) -> None:
        self.shares = tuple(shares)
        self.allowed = allowed  # shares the program can run (no weight dim cut to nothing on a rank)
        self.history: list[tuple[float, ...]] = []  # per step: every rank's compute seconds
        self.since_change = 0
        # per rank: (share, median compute) under the shares before the current ones
        self.before: list[tuple[int, float] | None] = [None] * len(self.shares)
        self.first: list[float] | None = None  # per rank: seconds per sample over the run's first steps
        self.drift = [1.0] * len(self.shares)  # per rank: seconds per sample now / over the first steps

    @staticmethod
    def per_sample(steps: Sequence[Sequence[float]], shares: Sequence[int]) -> list[float]:
        return [statistics.median(step[r] for step in steps) / s if s else 0.0 for r, s in enumerate(shares)]

    def replan_hint(self, ranks: Sequence[int] | None = None) -> str | None:
        """When the ranks' speeds have moved apart by ``REPLAN_DRIFT`` or more since the run began,
        moving samples may not be the best answer any more: another strategy (sharding
        differently, fewer ranks) might win. Say which rank (``ranks[r]`` where given: a pipeline
        stage's global ranks) and how much."""
        known = [d for d in self.drift if d > 0]
        if not known or max(known) / min(known) < REPLAN_DRIFT:
            return None
        r = max(range(len(self.drift)), key=lambda i: self.drift[i])
        who = ranks[r] if ranks else r
        return (f"rank {who} computes {self.drift[r] / min(known):.1f}x slower per sample, relative to the fastest "
                f"rank, than when this run began")

    def observe(self, compute_s: Sequence[float]) -> tuple[tuple[int, ...], str] | None:
        """Record one step's per-rank compute; returns (new shares, reason) when re-balancing pays."""
        self.history.append(tuple(compute_s))
        self.since_change += 1
        if self.since_change < max(WINDOW, COOLDOWN) or len(self.history) < WINDOW:
            return None
        recent = self.history[-WINDOW:]
        per_rank = [statistics.median(step[r] for step in recent) for r in range(len(self.shares))]
        lines = [self.line(r, c) for r, c in enumerate(per_rank)]
        proposal = balanced(sum(self.shares), lines)
        if proposal is None:
            return None
        now = max(c for c, s in zip(per_rank, self.shares) if s) if any(self.shares) else 0.0
        then = max(a + b * s for (a, b), s in zip(lines, proposal))
        if proposal == self.shares or now <= 0 or then > now * (1 - MIN_GAIN):
            return None
        if self.allowed is not None and not self.allowed(proposal):
            return None
        reason = (f"measured compute per step {', '.join(f'{c * 1e3:.1f}' for c in per_rank)} ms "
                  f"(median of {WINDOW} steps); the slowest rank's {now * 1e3:.1f} ms is predicted to fall to "
                  f"{then * 1e3:.1f} ms")
        if self.first is None:
            self.first = self.per_sample(self.history[:WINDOW], self.shares)
        self.drift = [now_ / then_ if then_ else 1.0
                      for now_, then_ in zip([c / s if s else 0.0 for c, s in zip(per_rank, self.shares)],
                                             self.first)]
        self.before = [(s, c) for s, c in zip(self.shares, per_rank)]
        self.shares = proposal
        self.since_change = 0
        return proposal, reason

    def line(self, r: int, compute: float) -> tuple[float, float]:
        """Rank r's compute as a + b x its share: through its last two measured shares where it
        has two (fixed per-step work, such as small ops' launch costs, does not move with the
        share), else proportional to its share."""
        share = self.shares[r]
        rates = [c / s for c, s in zip(self.history[-1], self.shares) if s]
        fallback = min(rates) if rates else 1.0
        if self.before[r] is not None and self.before[r][0] != share:
            s0, c0 = self.before[r]
            slope = (compute - c0) / (share - s0)
            floor = 0.05 * (compute / share if share else fallback)  # noise must not make a rank free
            slope = max(slope, floor)
            return max(compute - slope * share, 0.0), slope
        return 0.0, compute / share if share else fallback


def balanced(total: int, lines: Sequence[tuple[float, float]]) -> tuple[int, ...] | None:
    """Integer shares summing to ``total`` that minimise the slowest rank's a + b x share:
    the common finishing time T by bisection, each rank's (T - a) / b samples, rounded by
    largest remainder."""
    if not lines or total <= 0 or any(b <= 0 for _, b in lines):
        return None
    lo, hi = 0.0, max(a + b * total for a, b in lines)
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(max(0.0, (mid - a) / b) for a, b in lines) >= total:
            hi = mid
        else:
            lo = mid
    parts = [max(0.0, (hi - a) / b) for a, b in lines]
    if not sum(parts) > 0:
        return None
    return largest_remainder(total, parts)

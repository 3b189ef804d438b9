"""Emulating a slower device on one CPU machine.

With `set_emulation(s)`, every communication (forward and backward collectives, gradient
all-reduce) and `end_segment()` first waits (busy) `(s - 1) x` the wall time this rank spent since the end
of its previous communication (its compute in that segment), so the rank behaves like a device
`s` times slower. The clock restarts after each communication, so neither the wait nor the time
spent waiting for other ranks counts as compute. What runs inside `undilated()` (the emitted
program's batch loading, gradient-bucket sync and optimizer step) is not slowed: an emulated device
is slower at the model's forward and backward compute, and at nothing else (the host does the rest).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

_slowdown: float = 1.0
_seg_start: float = time.perf_counter()
_total_sleep: float = 0.0
_undilated_depth: int = 0  # inside undilated(): nothing is dilated, collectives included
_comm_start: float = _seg_start  # when the current collective began (after its segment's dilation)
_comm_total: float = 0.0  # seconds spent in collectives so far


def set_emulation(slowdown: float) -> None:
    """Make this rank behave as if its compute were `slowdown` times slower (1 = off)."""
    global _slowdown, _seg_start
    slowdown = float(slowdown)
    if not slowdown >= 1.0:
        raise ValueError(f"hap.runtime.set_emulation: slowdown must be >= 1 (got {slowdown}); "
                         "a device cannot be emulated faster than the machine running it")
    _slowdown = slowdown
    _seg_start = time.perf_counter()


def slowdown() -> float:
    return _slowdown


def total_sleep() -> float:
    """Seconds slept for emulation so far on this rank (for reports and tests)."""
    return _total_sleep


def _spin(seconds: float) -> None:
    """Stay busy for ``seconds``: a slower device is busy, not idle. A sleeping process comes back
    to a cold core (caches, clock, the VM's vCPU) and runs its next segment slower, which the
    emulated device would not."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def before_comm() -> None:
    """Wait (busy) the emulated extra compute time of the segment that ends here."""
    global _total_sleep, _comm_start
    if _slowdown > 1.0 and not _undilated_depth:
        extra = (_slowdown - 1.0) * (time.perf_counter() - _seg_start)
        if extra > 0:
            _spin(extra)
            _total_sleep += extra
    _comm_start = time.perf_counter()


def comm_seconds() -> float:
    """Seconds this rank has spent inside collectives (sending, and waiting for other ranks),
    emulated or not: a step's wall time less this is the rank's own compute."""
    return _comm_total


def after_comm() -> None:
    """Start the next compute segment."""
    global _seg_start, _comm_total
    _seg_start = time.perf_counter()
    _comm_total += _seg_start - _comm_start


@contextmanager
def undilated():
    """Work that the emulated device does not slow: the segment so far is dilated first, and the
    clock restarts after the block (loading the batch, the optimizer step: the emulated slowdown
    is of the model's forward and backward compute only). Collectives inside the block (the
    gradient buckets' all-reduce) dilate nothing either."""
    global _undilated_depth
    before_comm()
    _undilated_depth += 1
    try:
        yield
    finally:
        _undilated_depth -= 1
        after_comm()


def end_segment() -> None:
    """Flush the current segment's emulated delay (call at the end of a step)."""
    before_comm()
    after_comm()

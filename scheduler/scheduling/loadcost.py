"""What a model's load costs: the median of its last few load times, and the waits
told to clients from it. Pure: no clock, no I/O.

A load is measured from the launch to the first good /health (the child's whole
start, a packaged model's file assembled on its first launch included), and a slot
restore from its request to its answer (scheduler/process/slotcache.py). The median of
the last ``SAMPLES`` keeps one slow outlier (a cold page cache, a busy machine) from
moving the estimate; a model never loaded has none, and callers fall back to their
own defaults.
"""

from __future__ import annotations

import statistics
from collections import deque

# Load times kept per model: few, so that a model whose file moves to a faster disk
# (or whose context changes) is re-estimated within a few loads.
SAMPLES = 5

# What a wait is told when a model has never been loaded: about what the default model
# takes on this class of machine, rounded up.
UNKNOWN_LOAD = 5.0


class LoadTimes:
    """The last ``SAMPLES`` load times (seconds) of one model, and their median."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: deque[float] = deque(maxlen=SAMPLES)

    def add(self, seconds: float) -> None:
        if seconds >= 0:
            self._seen.append(seconds)

    @property
    def median(self) -> float | None:
        return statistics.median(self._seen) if self._seen else None

    def __len__(self) -> int:
        return len(self._seen)


def remaining(expected: float | None, elapsed: float) -> float:
    """Seconds a load that began ``elapsed`` seconds ago may still take: the median
    less what has passed, at least one second (a load past its median is late, not
    done), ``UNKNOWN_LOAD`` for a model never loaded."""
    if expected is None:
        return max(1.0, UNKNOWN_LOAD - elapsed)
    return max(1.0, expected - elapsed)


def progress(expected: float | None, elapsed: float) -> float:
    """A fraction in [0, 0.99] for a load bar: time over the median while the median
    holds, then creeping towards 0.99 (llama-server reports no progress of its own)."""
    span = expected if expected is not None and expected > 0 else UNKNOWN_LOAD
    if elapsed <= 0:
        return 0.0
    if elapsed < span * 0.9:
        return round(elapsed / span, 4)
    # Past 90 % of the median: halve the rest every further median, never reaching 1.
    over = (elapsed - span * 0.9) / span
    return round(min(0.99, 1.0 - 0.1 * float(0.5 ** over)), 4)

"""A model's wait queue, fair across API keys and ordered by key priority.

The scheduler used a FIFO deque per model: one key with 50 queued calls put every
other key's first call behind all 50. ``FairQueue`` keeps one FIFO per key inside
each priority level and serves the levels highest first; within a level it takes
one call from each key in turn (round robin, which is deficit round robin with a
quantum of one call, every call costing the same: a call's tokens are unknown until
it has run). So a key waits behind at most one call of each other key of its level,
whatever their backlog.

When the queue is full, a newcomer whose key has fewer calls waiting than the
biggest backlog pushes that backlog's newest call out (it fails with 503 and
Retry-After) instead of being refused itself: a flood fills only its own share.

Pure data structure: no clock, no I/O; the scheduler calls it on the event loop.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Entry(Protocol):
    @property
    def tenant(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def enqueued(self) -> float: ...


W = TypeVar("W", bound=Entry)


class FairQueue(Generic[W]):
    """The deque operations the scheduler uses (append, ``[0]``, popleft, remove,
    ``in``, len), in fair order."""

    __slots__ = ("_levels", "_n")

    def __init__(self) -> None:
        # priority -> key name -> that key's calls, oldest first. The OrderedDict's
        # order is the round robin's: the key served last moves to the end.
        self._levels: dict[int, OrderedDict[str, deque[W]]] = {}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator[W]:
        for level in self._levels.values():
            for calls in level.values():
                yield from calls

    def __contains__(self, w: object) -> bool:
        # Only its own key's FIFO can hold it.
        level = self._levels.get(getattr(w, "priority", 0))
        calls = level.get(getattr(w, "tenant", "")) if level is not None else None
        return calls is not None and w in calls

    def append(self, w: W) -> None:
        level = self._levels.setdefault(w.priority, OrderedDict())
        level.setdefault(w.tenant, deque()).append(w)
        self._n += 1

    def _top(self) -> OrderedDict[str, deque[W]]:
        if not self._n:
            raise IndexError("the queue is empty")
        return self._levels[max(self._levels)]

    def __getitem__(self, index: int) -> W:
        """Only ``[0]``: the call ``popleft()`` would return."""
        if index != 0:
            raise IndexError("only the head of a FairQueue can be read")
        return next(iter(self._top().values()))[0]

    def popleft(self) -> W:
        level = self._top()
        tenant, calls = next(iter(level.items()))
        w = calls.popleft()
        if calls:
            level.move_to_end(tenant)
        else:
            del level[tenant]
        self._drop_empty(w.priority)
        self._n -= 1
        return w

    def head_run(self, n: int) -> list[W]:
        """The first ``n`` calls of the head's key, oldest first: serving one of them
        before the head changes no other key's turn."""
        return list(itertools.islice(next(iter(self._top().values())), n))

    def take(self, w: W) -> None:
        """``popleft()`` for a call of ``head_run()``: served, its key's turn passes."""
        level = self._top()
        tenant, calls = next(iter(level.items()))
        calls.remove(w)
        if calls:
            level.move_to_end(tenant)
        else:
            del level[tenant]
        self._drop_empty(w.priority)
        self._n -= 1

    def remove(self, w: W) -> None:
        level = self._levels.get(w.priority)
        calls = level.get(w.tenant) if level is not None else None
        if calls is None or level is None:
            raise ValueError("not queued")
        calls.remove(w)
        if not calls:
            del level[w.tenant]
        self._drop_empty(w.priority)
        self._n -= 1

    def _drop_empty(self, priority: int) -> None:
        if not self._levels[priority]:
            del self._levels[priority]

    def oldest(self) -> W | None:
        """The call that has waited longest (each key's FIFO head is its oldest)."""
        heads = [calls[0] for level in self._levels.values() for calls in level.values()]
        return min(heads, key=lambda w: w.enqueued) if heads else None

    def count(self, tenant: str) -> int:
        return sum(len(level.get(tenant, ())) for level in self._levels.values())

    def push_out(self, tenant: str) -> W | None:
        """Make room for a call of ``tenant`` in a full queue: remove and return the
        newest call of the key with the most calls waiting, if that key has more
        waiting than ``tenant`` would have with its new call; else None (the
        newcomer is the one refused)."""
        counts: dict[str, int] = {}
        for level in self._levels.values():
            for name, calls in level.items():
                counts[name] = counts.get(name, 0) + len(calls)
        if not counts:
            return None
        biggest = max(counts, key=lambda n: counts[n])
        if biggest == tenant or counts[biggest] <= counts.get(tenant, 0) + 1:
            return None
        # Its newest call: the one that joined last, at its lowest priority.
        newest: W | None = None
        for priority in sorted(self._levels):
            mine = self._levels[priority].get(biggest)
            if mine:
                newest = mine[-1]
                break
        assert newest is not None
        self.remove(newest)
        return newest

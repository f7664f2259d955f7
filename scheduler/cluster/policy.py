"""Pure node choice for a cluster front. No I/O, no logging, no clocks.

For one call to one model the front knows, per node that serves it, what the node last
reported (its ready and starting instances of the model, their in-flight calls and
queue, whether it could launch another) and what the front itself has sent there
since. The choice, in order:

1. a node with a ready instance below ``max_load``: the one this front sent the
   longest prefix of the call (its prompt caches hold it; matches under
   ``prefixes.MIN_MATCH`` count as none), then the least loaded, then the longest
   short match, then the node with the fewest calls overall;
2. a node whose instance of the model is starting (or that this front already sent
   a cold call to) with room in it: the launch on its way is the soonest one;
3. a node that can launch the model without evicting a busy instance: one with free
   room first, then one that must evict idle instances; the least busy node first;
4. none: the call waits in the front's queue (bounded, with retry-after), and the
   choice runs again when a call ends or a node reports.

The load of a node is an estimate: its last report counted every front's calls; of
this front's own, those it may have counted (``own_at_poll``: in flight when the poll
left, or started before its answer came) are taken out, and those in flight now
(``own``, known exactly) are added. A front never overshoots a node by its own calls
between two polls, and several fronts side by side need no shared state: each sees
the others' calls in the reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from scheduler.scheduling.prefixes import MIN_MATCH

# What a node can do to bring up another instance of a model, from its own policy.
LaunchKind = Literal["now", "evict", "wait", "never"]


@dataclass(frozen=True, slots=True)
class NodeOption:
    """One node that serves the model, as the front sees it for one call."""

    id: str
    # Slots of ready instances of the model, and of instances still starting.
    ready_slots: int
    starting_slots: int
    # Calls on those instances plus calls in the node's queue for the model.
    reported: int
    # This front's calls to the node for this model: now, and when the report left.
    own: int
    own_at_poll: int
    launch: LaunchKind
    # Slots one new instance of the model would bring.
    slots_per_instance: int
    # Tie-breakers: calls on the whole node, bytes of its memory budget left.
    node_calls: int = 0
    free_memory: int = 0

    @property
    def calls(self) -> int:
        """Calls the node holds for the model now, as best this front can tell."""
        return max(self.own, self.reported - self.own_at_poll + self.own)


def pick_node(
    options: Iterable[NodeOption], matched: Mapping[str, int] | None, max_load: float
) -> str | None:
    """The node that should take the call, or None to queue it; see the module.
    ``matched``: bytes of the call's prefix each node holds, by option id."""
    matched = matched or {}
    ready: list[tuple[tuple[int, float, int, int], str]] = []
    starting: list[tuple[tuple[float, int, int], str]] = []
    launch: list[tuple[tuple[int, int, int], str]] = []
    for o in options:
        calls = o.calls
        match = matched.get(o.id, 0)
        worth = match if match >= MIN_MATCH else 0
        if o.ready_slots and calls < o.ready_slots * max_load:
            ready.append(((-worth, calls / o.ready_slots, -match, o.node_calls), o.id))
            continue
        coming = o.starting_slots
        if not o.ready_slots and not coming and o.own and o.launch in ("now", "evict"):
            # This front's cold calls started a launch the report does not show yet.
            coming = o.slots_per_instance
        if coming and calls < (o.ready_slots + coming) * max_load:
            starting.append(((calls / (o.ready_slots + coming), -match, o.node_calls), o.id))
            continue
        if o.launch in ("now", "evict") and not (o.own and not o.ready_slots):
            rank = 0 if o.launch == "now" else 1
            launch.append(((rank, o.node_calls, -o.free_memory), o.id))
    if ready:
        return min(ready)[1]
    if starting:
        return min(starting)[1]
    if launch:
        return min(launch)[1]
    return None

"""Pure scheduling decisions over a snapshot. No I/O, no logging, no clocks.

The scheduler builds a ``Snapshot`` of the world, asks these functions what to do
and applies the answer. Keeping them pure lets the unit tests state every rule as
a table (snapshot → decision) and lets property tests check the invariants:

* the number of live processes never exceeds ``max_instances``;
* the sum of live footprints never exceeds the memory budget, in RAM and in VRAM;
* a busy instance (in-flight > 0) is never chosen for eviction;
* a pinned instance (its model has ``evictable = false``) is never evicted,
  preempted or expired;
* among idle instances, eviction takes the lowest model ``priority`` first, then the
  one that is cheapest to have back for how long it has sat idle (``evict_rank``:
  idle seconds over load seconds plus ``LOAD_FLOOR``); preemption never takes a model
  of higher priority than the one that waits.

Instances that are STOPPING still hold their process and memory, so they count
against both limits until they are gone; a launch that needs their room waits for
the stop to finish instead of overlapping it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from scheduler.process.instance import ALIVE, State
from scheduler.scheduling.prefixes import MIN_MATCH


@dataclass(frozen=True, slots=True)
class InstanceView:
    id: str
    model: str
    state: State
    in_flight: int
    slots: int
    last_used: float
    footprint: int = 0
    # Bytes of GPU memory it holds (0 for a CPU-only instance).
    vram: int = 0
    # Seconds of idleness after which the instance should stop; < 0 never.
    ttl: float = -1.0
    # False for a pinned model: never evicted, preempted or expired.
    evictable: bool = True
    # The model's priority: lower ones make room first.
    priority: int = 0
    # Median seconds its model takes to load (scheduler/scheduling/loadcost.py); 0
    # when never measured.
    load_cost: float = 0.0

    @property
    def alive(self) -> bool:
        return self.state in ALIVE

    @property
    def idle(self) -> bool:
        return self.state is State.READY and self.in_flight == 0

    @property
    def load(self) -> float:
        return self.in_flight / self.slots


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    instances: Sequence[InstanceView]
    max_instances: int
    # Bytes available to model footprints; None means not enforced.
    memory_budget: int | None = None
    # Bytes of GPU memory available to instances; None where there is no GPU.
    vram_budget: int | None = None
    # Replica limits per model name; a model absent here has (0, 1).
    replicas: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Launch:
    """Launch one instance of ``model`` once the ``evict`` instances have stopped."""

    model: str
    evict: tuple[str, ...] = ()

    @property
    def now(self) -> bool:
        return not self.evict


@dataclass(frozen=True, slots=True)
class Wait:
    """No launch possible now. ``reason`` is shown to operators and in errors."""

    reason: str
    never: bool = False  # it can never fit, whatever is evicted


class Candidate(Protocol):
    """What pick_instance reads: a live Instance or an InstanceView."""

    @property
    def id(self) -> str: ...
    @property
    def state(self) -> State: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def slots(self) -> int: ...
    @property
    def last_used(self) -> float: ...


C = TypeVar("C", bound=Candidate)


def pick_instance(
    candidates: Iterable[C], matched: Mapping[str, int] | None = None, max_load: float = 1.0
) -> C | None:
    """The ready instance with a free slot that holds the longest prefix of the call.

    ``matched`` gives, per candidate id, the bytes of the call's prefix it holds
    (scheduler/scheduling/prefixes.py). Among candidates below ``max_load``, the
    longest match wins, matches under ``MIN_MATCH`` counting as none (a hot replica
    is not made hotter for a prefix cheaper to re-process than to wait for); then the
    lowest load, then the longest short match, then a local instance, then the remote
    furthest below its weighted share, then the most recently used one, which keeps
    the other replicas idle so they can expire. Candidates at or above ``max_load``
    come after all of those.
    """
    matched = matched or {}
    best: C | None = None
    best_key: tuple[int, int, float, int, float, float] | None = None
    for inst in candidates:
        if inst.state is not State.READY or inst.in_flight >= inst.slots:
            continue
        load = inst.in_flight / inst.slots
        hot = load >= max_load
        match = matched.get(inst.id, 0)
        worth = 0 if hot or match < MIN_MATCH else match
        # Remotes have a ``share`` (calls served ÷ weight): at equal load the one
        # furthest below its weighted share goes next, so weights split the calls;
        # local instances have none (0), which also puts them before remotes.
        share: float = getattr(inst, "share", 0.0)
        # A short match still breaks a tie of load: the cache it holds is free.
        key = (int(hot), -worth, load, -match, share, -inst.last_used)
        if best_key is None or key < best_key:
            best, best_key = inst, key
    return best


def avoiding(candidates: list[C], avoid: frozenset[str]) -> list[C]:
    """The candidates for a call resent after failing on the ``avoid`` upstreams:
    the others, as long as one of them is ready or starting (the call waits for it, or
    for a launch, rather than going back); else all of them.

    Going back is safe only because a failure is reported first: a remote that failed
    is out of rotation (not READY) until a good check, a local child that exited is
    gone, one that lives has answered /health since.
    """
    if not avoid:
        return candidates
    others = [c for c in candidates if c.id not in avoid]
    if any(c.state in (State.READY, State.STARTING) for c in others):
        return others
    return candidates


def plan_launch(snap: Snapshot, model: str, footprint: int = 0, vram: int = 0) -> Launch | Wait:
    """Can another instance of ``model`` start, and what must stop first?

    ``footprint`` is the RAM one instance needs, ``vram`` its GPU memory. Evicts idle
    instances of other models, least recently used first, and only as many as
    needed. Never evicts a busy one.
    """
    mine = [i for i in snap.instances if i.model == model and i.alive]
    _, max_replicas = snap.replicas.get(model, (0, 1))
    if len(mine) >= max_replicas:
        return Wait(f"model '{model}' has its maximum of {max_replicas} instance(s)")
    for need, budget, what in ((footprint, snap.memory_budget, "memory"),
                               (vram, snap.vram_budget, "VRAM")):
        if budget is not None and need > budget:
            return Wait(
                f"model '{model}' needs {_mib(need)} but the {what} budget is {_mib(budget)}",
                never=True,
            )

    alive = [i for i in snap.instances if i.alive]
    count = len(alive)
    used = sum(i.footprint for i in alive)
    used_vram = sum(i.vram for i in alive)

    def fits(n: int, mem: int, gpu: int) -> bool:
        if n + 1 > snap.max_instances:
            return False
        if snap.memory_budget is not None and mem + footprint > snap.memory_budget:
            return False
        return snap.vram_budget is None or gpu + vram <= snap.vram_budget

    if fits(count, used, used_vram):
        return Launch(model)

    # Room already being freed by instances that drain or stop: wait for it rather
    # than evicting more than needed.
    freeing = [i for i in alive if i.state in (State.DRAINING, State.STOPPING)]
    freed_n = len(freeing)
    freed_mem = sum(i.footprint for i in freeing)
    freed_vram = sum(i.vram for i in freeing)
    if freeing and fits(count - freed_n, used - freed_mem, used_vram - freed_vram):
        return Wait("waiting for an instance to stop")

    victims: list[str] = []
    idle = sorted(
        (i for i in alive if i.idle and i.model != model and i.evictable),
        key=lambda i: evict_rank(i, snap.now),
    )
    for inst in idle:
        victims.append(inst.id)
        freed_n += 1
        freed_mem += inst.footprint
        freed_vram += inst.vram
        if fits(count - freed_n, used - freed_mem, used_vram - freed_vram):
            return Launch(model, tuple(victims))
    return Wait("every instance is busy")


# Seconds added to every load cost in ``evict_rank``: a model never measured (0 s)
# is not infinitely cheaper to reload than one measured at 0.3 s, and idle time still
# orders models whose loads are both quick.
LOAD_FLOOR = 1.0


def evict_rank(inst: InstanceView, now: float) -> tuple[int, float, float, str]:
    """The order in which idle instances make room: smallest first.

    Lowest ``priority`` first; within a priority, the highest
    ``idle / (load_cost + LOAD_FLOOR)`` first, where ``idle`` is the seconds since its
    last call and ``load_cost`` the median seconds its model takes to load. An idle
    second weighs less the dearer the model is to load again: of two models idle for
    equally long, one that loads in 40 s outlives one that loads in 2 s (score
    ``idle/41`` against ``idle/3``), and it goes first only once it has sat idle about
    14 times longer. Ties: the least recently used, then the id (deterministic).
    """
    idle = max(0.0, now - inst.last_used)
    return (inst.priority, -idle / (max(0.0, inst.load_cost) + LOAD_FLOOR), inst.last_used,
            inst.id)


def expired(snap: Snapshot) -> list[str]:
    """Idle instances whose TTL has passed, keeping each model's minimum replicas."""
    out: list[str] = []
    by_model: dict[str, list[InstanceView]] = {}
    for inst in snap.instances:
        # DRAINING instances are on their way out: they do not keep a model at its
        # minimum, or the last warm replica would expire beside a dying one.
        if inst.state in (State.READY, State.STARTING):
            by_model.setdefault(inst.model, []).append(inst)
    for model, insts in by_model.items():
        keep, _ = snap.replicas.get(model, (0, 1))
        live = len(insts)
        # Oldest idle first, so the replica that keeps the minimum is the warm one.
        for inst in sorted(insts, key=lambda i: i.last_used):
            if live <= keep:
                break
            if (inst.idle and inst.evictable and inst.ttl >= 0
                    and snap.now - inst.last_used >= inst.ttl):
                out.append(inst.id)
                live -= 1
    return out


def preempt(snap: Snapshot, model: str, priority: int = 0) -> str | None:
    """A busy instance of another model to drain so that ``model`` can run at all.

    Used only after a caller has waited past the starvation limit. Picks by
    ``evict_rank`` (the lowest priority, then the cheapest to have back), never a
    pinned one nor one of a
    model with a higher ``priority`` than the waiting model's; it is drained (it
    finishes what it runs), never killed.
    """
    candidates = [
        i for i in snap.instances
        if i.model != model and i.state is State.READY and i.evictable
        and i.priority <= priority
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda i: evict_rank(i, snap.now)).id


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"

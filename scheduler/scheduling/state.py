"""What the scheduler keeps per model and what a lease hands out.

The data of scheduler.Scheduler, apart from its behaviour: a model's state (its
instances, remotes, fair queue, prefix indexes, launch failures), a queued call, the
hints a call brings and the Upstream it gets, and the events the scheduler reports.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from scheduler.config.root import ModelConfig
from scheduler.engines.egress import PLAIN, Egress
from scheduler.engines.remote import Remote
from scheduler.errors import (
    LoadFailed,
)
from scheduler.keys import tenants
from scheduler.process.instance import ALIVE, Instance
from scheduler.scheduling.contexts import Contexts
from scheduler.scheduling.loadcost import LoadTimes
from scheduler.scheduling.prefixes import Chain, PrefixIndex
from scheduler.scheduling.queueing import FairQueue

if TYPE_CHECKING:
    from scheduler.models.gguf_file import ModelSize

# What a lease hands out: a local child or a remote endpoint; both keep their own state.
Servable = Instance | Remote

# After this many launches in a row fail, a model is unavailable until its config
# changes or an operator resets it: a crash loop helps nobody and hides the cause.
MAX_LAUNCH_FAILURES = 5


def oldest_wait(m: ModelState) -> float:
    """When the longest-waiting call of a model's queue joined it."""
    w = m.queue.oldest()
    return w.enqueued if w is not None else 0.0


@functools.lru_cache(maxsize=64)
def api_set(api: tuple[str, ...] | None) -> frozenset[str] | None:
    # Cached: lease() is the hot path and configs repeat the same few tuples.
    return None if api is None else frozenset(api)


def launch_backoff(failures: int) -> float:
    """Seconds to wait before launch number ``failures + 1``: 0.5, 1, 2, 4 ... ≤ 30."""
    return 0.0 if failures <= 0 else min(30.0, 0.5 * 2 ** (failures - 1))


@dataclass(frozen=True, slots=True)
class LeaseHints:
    # The call's prompt as a chain of prefixes (scheduler/scheduling/prefixes.py): it
    # goes to the upstream that holds the longest of them, and a fresh slot gets the
    # saved slot that holds the longest.
    chain: Chain = ()
    # Seconds this instance should stay loaded after the call (Ollama keep_alive,
    # LM Studio ttl); < 0 forever; None: the model's ttl.
    keep_alive: float | None = None
    # Upstreams (instance ids) this call already failed on: a resend goes elsewhere
    # while another is ready or starting (policy.avoiding).
    avoid: frozenset[str] = frozenset()
    # Tokens per slot the call must have (its prompt, counted): only an instance with
    # that much context serves it; more than the model can have is ContextTooLong.
    need_ctx: int = 0
    # Tokens per slot the caller asked for (Ollama num_ctx, LM Studio context_length),
    # given as far as the model can (scheduler/scheduling/contexts.py).
    want_ctx: int = 0


@dataclass(frozen=True, slots=True)
class Upstream:
    """What the proxy needs to forward one call."""

    base_url: str
    instance_id: str
    # The model that serves the call: the requested one, or one of its fallbacks.
    model: str
    # Seconds the call waited for a slot or a launch (Ollama's load_duration).
    waited: float
    # The API families the upstream speaks natively: the servable's own (a runtime's
    # or a remote's `api`), else ModelConfig.api; None: all that llama-server speaks.
    # The proxy translates a family missing here to chat.
    apis: frozenset[str] | None = None
    # How the call leaves for this upstream: a remote's key and headers, the model
    # name it expects, TLS (scheduler/engines/egress.py).
    egress: Egress = PLAIN
    # The llama-server slot the call must run in (``id_slot``), chosen by the slot
    # cache so that it knows which conversation each slot holds; None: any.
    slot: int | None = None
    # Tokens of context per slot of the instance; 0: unknown (a remote, a runtime).
    ctx: int = 0


class Waiter:
    __slots__ = ("enqueued", "fut", "hints", "passed", "priority", "tenant")

    def __init__(self, fut: asyncio.Future[Servable], enqueued: float, hints: LeaseHints,
                 key: tenants.Key | None = None):
        self.fut = fut
        self.enqueued = enqueued
        self.hints = hints
        # The fair queue's grouping: one FIFO per key, keys of higher priority first.
        self.tenant = key.name if key is not None else ""
        self.priority = key.priority if key is not None else 0
        # Times a later call of its key was served first, for holding a longer prefix
        # on the upstream that came free (dispatch.py); bounded by LOOKAHEAD.
        self.passed = 0


class ModelState:
    __slots__ = ("cfg", "ctx", "failures", "footprint", "instances", "last_error",
                 "load_times", "prefixes", "queue", "remotes", "restore_times", "retry_at",
                 "retry_handle", "scale", "size", "sized", "vram")

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.queue: FairQueue[Waiter] = FairQueue()
        self.instances: list[Instance] = []
        self.remotes: list[Remote] = []
        # Bytes of RAM and VRAM one instance needs: from the configured footprint or
        # the GGUF header, placed on the GPU where there is one; 0 until known.
        self.footprint = cfg.footprint or 0
        self.vram = 0
        self.sized = False
        # Upstream id -> the prefixes it served (bounded each; dropped with it).
        self.prefixes: dict[str, PrefixIndex] = {}
        # What the footprint depends on (GGUF header), and the contexts planned from
        # it (contexts.plan); None until the model's file has been read.
        self.size: ModelSize | None = None
        self.ctx: Contexts | None = None
        self.last_error: LoadFailed | None = None
        # Consecutive failed launches; reset by a successful one or by reset().
        self.failures = 0
        self.retry_at = 0.0
        self.retry_handle: asyncio.TimerHandle | None = None
        # Seconds its last few launches took to be ready: eviction's cost of having it
        # back, and the wait told to callers (scheduler/scheduling/loadcost.py).
        self.load_times = LoadTimes()
        # Seconds its slot restores took: a conversation back after a reload costs them
        # on top of the load (scheduler/process/slotcache.py).
        self.restore_times = LoadTimes()
        # Replicas an operator asked for while it runs (a replica added or removed,
        # Xinference's ``replica``): kept loaded past their TTL and allowed past
        # replicas.max until the model is unloaded; None: the config's alone.
        self.scale: int | None = None

    @property
    def unavailable(self) -> bool:
        return self.failures >= MAX_LAUNCH_FAILURES

    def servables(self) -> list[Servable]:
        return [*self.instances, *self.remotes]

    def alive(self) -> int:
        return sum(1 for i in self.instances if i.state in ALIVE)

    @property
    def min_replicas(self) -> int:
        # A pinned model keeps one instance loaded from the start.
        return max(self.cfg.replicas.min, 0 if self.cfg.evictable else 1, self.scale or 0)

    @property
    def reload_cost(self) -> float:
        """Seconds to have it back as it was: its median load, plus its median slot
        restore (0 for what was never measured)."""
        return (self.load_times.median or 0.0) + (self.restore_times.median or 0.0)

    @property
    def max_replicas(self) -> int:
        return max(self.cfg.replicas.max, self.scale or 0)


BinaryFinder = Callable[[Path | None], Path | None]
# (a model's upstreams, bytes of the call's prefix each holds by id, max_load) -> the
# one to take the call, or None.
Picker = Callable[[list[Servable], Mapping[str, int], float], Servable | None]


class Events(Protocol):
    """What the scheduler reports as it works (metrics, logs, the dashboard).

    Called synchronously on the event loop; implementations must be quick and must
    not raise.
    """

    def launched(self, model: str, seconds: float, ok: bool) -> None: ...

    def stopped(self, model: str, reason: str) -> None:
        """reason: idle | evicted | preempted | unload | shutdown | config | reload"""

    def crashed(self, model: str) -> None: ...

    def waited(self, model: str, seconds: float, outcome: str) -> None:
        """A queued call left the queue. outcome: granted | timeout | full |
        cancelled | failed"""


class NoEvents:
    def launched(self, model: str, seconds: float, ok: bool) -> None:
        pass

    def stopped(self, model: str, reason: str) -> None:
        pass

    def crashed(self, model: str) -> None:
        pass

    def waited(self, model: str, seconds: float, outcome: str) -> None:
        pass

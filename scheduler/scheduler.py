"""Scheduler.lease(): which instance serves this call now.

How it works, in one place (see docs/scheduling.md for the knobs):

* Every call takes a *lease*. If its model has no queue and a ready instance has a
  free slot, the lease is granted at once (the fast path: no future, no task).
  Otherwise the call joins the model's FIFO queue as a waiter with a future.
* ``_kick()`` is the only place that hands out queued slots and decides launches and
  evictions. It is synchronous, so on the event loop it is atomic: nothing can change
  between reading an instance and acting on it. It runs whenever something that can
  unblock a waiter happens (a call ends, an instance changes state, a waiter joins).
* Decisions come from ``policy`` (pure). Effects are tasks the scheduler owns:
  launching and stopping instances; every task is held and awaited on close().
* A lease is released on every exit path, cancellation included, so in-flight
  counts never drift. A waiter that is cancelled leaves the queue; if its slot was
  granted in the same loop iteration, the slot is given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from scheduler import policy
from scheduler.config import CorralConfig, ModelConfig
from scheduler.errors import (
    BinaryNotFound,
    CorralError,
    LoadFailed,
    Overloaded,
    ShuttingDown,
    UnknownModel,
)
from scheduler.instance import ALIVE, Instance, LaunchSpec, State
from scheduler.launcher import build_spec
from scheduler.sources import ModelFiles

log = logging.getLogger(__name__)

# How many conversation prefixes to remember per model for cache affinity.
_AFFINITY_ENTRIES = 1024
# After this many launches in a row fail, a model is unavailable until its config
# changes or an operator resets it: a crash loop helps nobody and hides the cause.
MAX_LAUNCH_FAILURES = 5


def launch_backoff(failures: int) -> float:
    """Seconds to wait before launch number ``failures + 1``: 0.5, 1, 2, 4 ... ≤ 30."""
    return 0.0 if failures <= 0 else min(30.0, 0.5 * 2 ** (failures - 1))


@dataclass(frozen=True, slots=True)
class LeaseHints:
    # A hash of the conversation's leading messages: calls that share it prefer the
    # replica that served it before, whose prompt cache holds that prefix.
    affinity: str | None = None
    # Seconds this instance should stay loaded after the call (Ollama keep_alive,
    # LM Studio ttl); < 0 forever; None: the model's ttl.
    keep_alive: float | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    """What the proxy needs to forward one call."""

    base_url: str
    instance_id: str
    model: str
    # Seconds the call waited for a slot or a launch (Ollama's load_duration).
    waited: float


class _Waiter:
    __slots__ = ("enqueued", "fut", "hints")

    def __init__(self, fut: asyncio.Future[Instance], enqueued: float, hints: LeaseHints):
        self.fut = fut
        self.enqueued = enqueued
        self.hints = hints


class _Model:
    __slots__ = ("affinity", "cfg", "failures", "instances", "last_error", "queue", "retry_at",
                 "retry_handle")

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.queue: deque[_Waiter] = deque()
        self.instances: list[Instance] = []
        self.affinity: OrderedDict[str, str] = OrderedDict()
        self.last_error: LoadFailed | None = None
        # Consecutive failed launches; reset by a successful one or by reset().
        self.failures = 0
        self.retry_at = 0.0
        self.retry_handle: asyncio.TimerHandle | None = None

    @property
    def unavailable(self) -> bool:
        return self.failures >= MAX_LAUNCH_FAILURES


BinaryFinder = Callable[[Path | None], Path | None]


class Events(Protocol):
    """What the scheduler reports as it works (metrics, logs, the dashboard).

    Called synchronously on the event loop; implementations must be quick and must
    not raise.
    """

    def launched(self, model: str, seconds: float, ok: bool) -> None: ...

    def stopped(self, model: str, reason: str) -> None:
        """reason: idle | evicted | preempted | unload | shutdown | config"""

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


def _default_finder(configured: Path | None) -> Path | None:
    from scheduler.install import find_llama_server

    return find_llama_server(configured)


class Scheduler:
    def __init__(
        self,
        cfg: CorralConfig,
        session: aiohttp.ClientSession,
        *,
        find_binary: BinaryFinder = _default_finder,
        clock: Callable[[], float] = time.monotonic,
        reap_interval: float = 0.5,
        events: Events | None = None,
    ) -> None:
        self._cfg = cfg
        self.events: Events = events or NoEvents()
        self._session = session
        self._find_binary = find_binary
        self._clock = clock
        self._reap_interval = reap_interval
        self._models: dict[str, _Model] = {}
        self._names: dict[str, _Model] = {}
        self._files = ModelFiles()
        self._binary: Path | None = None
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._kicking = False
        self._rekick = False
        self._reaper: asyncio.Task[None] | None = None
        self._apply_models(cfg)

    # -- configuration -----------------------------------------------------------

    def _apply_models(self, cfg: CorralConfig) -> None:
        for mc in cfg.models:
            self._models[mc.name] = _Model(mc)
        self._names = {}
        for m in self._models.values():
            for name in (m.cfg.name, *m.cfg.aliases):
                self._names[name] = m

    @property
    def config(self) -> CorralConfig:
        return self._cfg

    def resolve(self, name: str) -> ModelConfig:
        """The model a name or alias refers to; raises UnknownModel."""
        m = self._names.get(name)
        if m is None:
            raise UnknownModel(name, list(self._names))
        return m.cfg

    def balanced(self, name: str) -> bool:
        """Whether calls for this model may be spread over replicas (so affinity
        hints are worth computing)."""
        return False

    def names(self) -> list[str]:
        """Every model name and alias, in config order."""
        return list(self._names)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_loop(), name="corral-reaper")

    async def close(self) -> None:
        """Refuse new calls, fail queued ones, drain and stop every instance."""
        self._closing = True
        for m in self._models.values():
            if m.retry_handle is not None:
                m.retry_handle.cancel()
        for m in self._models.values():
            self._fail_waiters(m, ShuttingDown("Corral is shutting down"))
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for m in self._models.values():
            for inst in list(m.instances):
                self._retire(inst, "shutdown")
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- leases ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, name: str, hints: LeaseHints | None = None) -> AsyncIterator[Upstream]:
        m = self._names.get(name)
        if m is None:
            raise UnknownModel(name, list(self._names))
        if self._closing:
            raise ShuttingDown("Corral is shutting down")
        hints = hints or LeaseHints()
        start = self._clock()
        inst: Instance | None = None
        if not m.queue:
            preferred = m.affinity.get(hints.affinity) if hints.affinity else None
            inst = policy.pick_instance(m.instances, preferred)
            if inst is not None and not inst.try_acquire():
                inst = None
        if inst is None:
            inst = await self._wait(m, hints, start)
        if hints.affinity:
            self._remember(m, hints.affinity, inst.id)
        if hints.keep_alive is not None:
            inst.ttl_override = hints.keep_alive
        try:
            yield Upstream(inst.base_url, inst.id, m.cfg.name, self._clock() - start)
        finally:
            inst.release()

    async def _wait(self, m: _Model, hints: LeaseHints, start: float) -> Instance:
        sc = self._cfg.scheduler
        if len(m.queue) >= sc.queue_size:
            self.events.waited(m.cfg.name, 0.0, "full")
            raise Overloaded(
                f"model '{m.cfg.name}' has {len(m.queue)} calls waiting (queue_size "
                f"{sc.queue_size}); try again later",
                retry_after=self._retry_after(m),
            )
        fut: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(fut, start, hints)
        m.queue.append(waiter)
        self._kick()
        granted = False
        outcome = "cancelled"
        try:
            async with asyncio.timeout(sc.queue_timeout):
                inst = await fut
            granted = True
            outcome = "granted"
            return inst
        except CorralError:
            outcome = "failed"
            raise
        except TimeoutError:
            outcome = "timeout"
            raise Overloaded(
                f"model '{m.cfg.name}': no slot became free within {sc.queue_timeout:g} s",
                retry_after=self._retry_after(m),
            ) from None
        finally:
            self.events.waited(m.cfg.name, self._clock() - start, outcome)
            if waiter in m.queue:
                m.queue.remove(waiter)
            if not granted:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    # Granted in the same loop iteration the caller went away.
                    fut.result().release()
                else:
                    fut.cancel()

    def _retry_after(self, m: _Model) -> float:
        # A rough hint: the time a load takes, or a second when something is loaded.
        loading = any(i.state is State.STARTING for i in m.instances)
        return 5.0 if loading or not m.instances else 1.0

    def _remember(self, m: _Model, key: str, instance_id: str) -> None:
        m.affinity[key] = instance_id
        m.affinity.move_to_end(key)
        if len(m.affinity) > _AFFINITY_ENTRIES:
            m.affinity.popitem(last=False)

    # -- the dispatcher ----------------------------------------------------------

    def _kick(self) -> None:
        # Re-entrant calls (an instance changing state while we dispatch) ask for one
        # more pass instead of recursing.
        if self._kicking:
            self._rekick = True
            return
        self._kicking = True
        try:
            for _ in range(100):
                self._rekick = False
                self._dispatch()
                if not self._rekick:
                    break
        finally:
            self._kicking = False

    def _dispatch(self) -> None:
        waiting = sorted(
            (m for m in self._models.values() if m.queue), key=lambda m: m.queue[0].enqueued
        )
        for m in waiting:
            while m.queue:
                w = m.queue[0]
                if w.fut.done():
                    m.queue.popleft()
                    continue
                preferred = m.affinity.get(w.hints.affinity) if w.hints.affinity else None
                inst = policy.pick_instance(m.instances, preferred)
                if inst is None or not inst.try_acquire():
                    break
                m.queue.popleft()
                w.fut.set_result(inst)
            if m.queue and not self._closing:
                self._grow(m)

    def _grow(self, m: _Model) -> None:
        """Start (or make room for) another instance of ``m`` if none is on its way."""
        if any(i.state is State.STARTING for i in m.instances):
            return  # join the launch in progress
        if m.unavailable:
            self._fail_waiters(m, m.last_error or LoadFailed(m.cfg.name, "unavailable"))
            return
        now = self._clock()
        if now < m.retry_at:
            if m.retry_handle is None:
                loop = asyncio.get_running_loop()
                m.retry_handle = loop.call_later(m.retry_at - now, self._retry, m)
            return
        decision = policy.plan_launch(self._snapshot(), m.cfg.name)
        if isinstance(decision, policy.Wait):
            if decision.never:
                self._fail_waiters(m, LoadFailed(m.cfg.name, decision.reason))
            else:
                self._maybe_preempt(m)
            return
        if decision.evict:
            for iid in decision.evict:
                inst = self._instance(iid)
                if inst is not None:
                    log.info("evicting %s (idle) to make room for %s", iid, m.cfg.name)
                    self._retire(inst, "evicted")
            return  # launch once they have stopped; their stop kicks us again
        self._launch(m)

    def _retry(self, m: _Model) -> None:
        m.retry_handle = None
        self._kick()

    def _maybe_preempt(self, m: _Model) -> None:
        # A hot model must not starve a waiting one: after half the queue timeout the
        # least recently used instance of another model stops taking calls, finishes
        # the ones it runs, and yields its room.
        waited = self._clock() - m.queue[0].enqueued
        if waited < self._cfg.scheduler.queue_timeout / 2:
            return
        snap = self._snapshot()
        if any(i.state in (State.DRAINING, State.STOPPING) for i in snap.instances):
            return
        victim = policy.preempt(snap, m.cfg.name)
        inst = self._instance(victim) if victim else None
        if inst is not None:
            log.info("draining %s: %s has waited %.1f s", inst.id, m.cfg.name, waited)
            self._retire(inst, "preempted")

    def _snapshot(self) -> policy.Snapshot:
        now = self._clock()
        views = []
        for m in self._models.values():
            ttl = self._cfg.ttl(m.cfg)
            for i in m.instances:
                views.append(
                    policy.InstanceView(
                        id=i.id,
                        model=i.model,
                        state=i.state,
                        in_flight=i.in_flight,
                        slots=i.slots,
                        last_used=i.last_used,
                        footprint=i.footprint,
                        ttl=ttl if i.ttl_override is None else i.ttl_override,
                    )
                )
        return policy.Snapshot(
            now=now,
            instances=views,
            max_instances=self._cfg.scheduler.max_instances,
            replicas={name: (0, 1) for name in self._models},
        )

    def _instance(self, iid: str) -> Instance | None:
        for m in self._models.values():
            for i in m.instances:
                if i.id == iid:
                    return i
        return None

    # -- effects -----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _launch(self, m: _Model) -> Instance:
        iid = f"{m.cfg.name}#{next(self._ids)}"
        inst = Instance(
            iid,
            m.cfg.name,
            m.cfg.parallel,
            self._on_change,
            log_lines=self._cfg.scheduler.log_lines,
            clock=self._clock,
        )
        m.instances.append(inst)
        self._spawn(self._run_launch(m, inst), f"launch {iid}")
        return inst

    async def _prepare(self, m: _Model) -> LaunchSpec:
        if self._binary is None:
            configured = self._cfg.llama_server.binary
            try:
                found = await asyncio.to_thread(self._find_binary, configured)
            except BinaryNotFound as e:
                raise LoadFailed(m.cfg.name, e.message) from None
            if found is None:
                raise LoadFailed(
                    m.cfg.name,
                    "no llama-server binary found: set llama_server.binary, put "
                    "llama-server on PATH, or run `corral install-llama-server`",
                )
            self._binary = found
        model_file = await self._files.get(m.cfg)
        return build_spec(self._cfg, m.cfg, self._binary, model_file)

    async def _run_launch(self, m: _Model, inst: Instance) -> None:
        try:
            await inst.start(self._session, lambda: self._prepare(m))
        except CorralError as e:
            err = e if isinstance(e, LoadFailed) else LoadFailed(m.cfg.name, e.message)
            if m.unavailable:
                err = LoadFailed(
                    m.cfg.name,
                    f"{err.reason}; unavailable after {m.failures} failed launches "
                    "(fix the config or reset the model)",
                    err.log_tail,
                )
            log.error("%s", err.message)
            self.events.launched(m.cfg.name, self._clock() - inst.stats.launched_at, False)
            m.last_error = err
            # The calls waiting for this launch fail now, with the child's last words,
            # instead of timing out in the queue.
            self._fail_waiters(m, err)
        else:
            m.last_error = None
            m.failures = 0
            self.events.launched(m.cfg.name, inst.stats.load_seconds, True)
            log.info("instance %s ready in %.2f s", inst.id, inst.stats.load_seconds)
        finally:
            self._kick()

    def _retire(self, inst: Instance, reason: str) -> None:
        """Drain and stop an instance in the background (idempotent)."""
        if inst.state in (State.STOPPING, State.STOPPED, State.DRAINING):
            return
        self.events.stopped(inst.model, reason)
        inst.drain()
        sc = self._cfg.scheduler
        self._spawn(inst.stop(sc.drain_timeout, sc.stop_timeout), f"stop {inst.id}")

    def _on_change(self, inst: Instance) -> None:
        if inst.state in (State.STOPPED, State.FAILED):
            m = self._models.get(inst.model)
            if m is not None and inst in m.instances:
                m.instances.remove(inst)
                if inst.state is State.FAILED and inst.stats.ready_at:
                    self.events.crashed(inst.model)
                if inst.state is State.FAILED and not inst.stats.ready_at:
                    # Counted here, not where start() raises: this callback runs
                    # first, and its kick must already see the backoff.
                    m.failures += 1
                    m.retry_at = self._clock() + launch_backoff(m.failures)
        if not self._closing:
            self._kick()

    def _fail_waiters(self, m: _Model, error: CorralError) -> None:
        while m.queue:
            w = m.queue.popleft()
            if not w.fut.done():
                w.fut.set_exception(error)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            for iid in policy.expired(self._snapshot()):
                inst = self._instance(iid)
                if inst is not None:
                    log.info("unloading %s: idle past its ttl", iid)
                    self._retire(inst, "idle")

    # -- views -------------------------------------------------------------------

    def instances(self) -> list[Instance]:
        return [i for m in self._models.values() for i in m.instances]

    def loaded(self, name: str) -> list[Instance]:
        m = self._names.get(name)
        return [] if m is None else [i for i in m.instances if i.state in ALIVE]

    def model_status(self) -> list[dict[str, object]]:
        out = []
        for m in self._models.values():
            states = [i.state for i in m.instances]
            if State.READY in states:
                state = "loaded"
            elif State.STARTING in states:
                state = "loading"
            elif m.unavailable:
                state = "unavailable"
            elif m.last_error is not None:
                state = "failed"
            else:
                state = "not-loaded"
            out.append(
                {
                    "name": m.cfg.name,
                    "aliases": list(m.cfg.aliases),
                    "state": state,
                    "queued": len(m.queue),
                    "instances": [i.describe() for i in m.instances],
                    "last_error": m.last_error.message if m.last_error else None,
                    "failures": m.failures,
                }
            )
        return out

    async def load(self, name: str) -> Upstream:
        """Make sure the model has a ready instance (admin/Ollama preload)."""
        async with self.lease(name) as up:
            return up

    def reset(self, name: str) -> None:
        """Forget a model's launch failures so the next call tries again."""
        m = self._names.get(name)
        if m is None:
            raise UnknownModel(name, list(self._names))
        m.failures = 0
        m.retry_at = 0.0
        m.last_error = None

    async def unload(self, name: str) -> int:
        """Drain and stop every instance of a model; returns how many."""
        m = self._names.get(name)
        if m is None:
            raise UnknownModel(name, list(self._names))
        insts = [i for i in m.instances if i.state in ALIVE]
        for inst in insts:
            self._retire(inst, "unload")
        return len(insts)

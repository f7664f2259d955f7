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
import functools
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from scheduler import policy, tenants
from scheduler.config import CorralConfig, ModelConfig
from scheduler.engines import hooks
from scheduler.engines.egress import PLAIN, Egress
from scheduler.engines.providers import Providers
from scheduler.engines.remote import Remote
from scheduler.errors import (
    BinaryNotFound,
    CorralError,
    LoadFailed,
    Overloaded,
    ShuttingDown,
    UnknownModel,
)
from scheduler.health import HealthWatch
from scheduler.instance import ALIVE, Instance, LaunchSpec, State
from scheduler.launcher import build_spec
from scheduler.queueing import FairQueue
from scheduler.slotcache import SAVE_REASONS, SlotCache
from scheduler.sources import ModelFiles, model_placement, with_local_files

# What a lease hands out: a local child or a remote endpoint; both keep their own state.
Servable = Instance | Remote

log = logging.getLogger(__name__)

# How many conversation prefixes to remember per model for cache affinity.
_AFFINITY_ENTRIES = 1024
# After this many launches in a row fail, a model is unavailable until its config
# changes or an operator resets it: a crash loop helps nobody and hides the cause.
MAX_LAUNCH_FAILURES = 5


def _oldest(m: _Model) -> float:
    """When the longest-waiting call of a model's queue joined it."""
    w = m.queue.oldest()
    return w.enqueued if w is not None else 0.0


@functools.lru_cache(maxsize=64)
def _apis(api: tuple[str, ...] | None) -> frozenset[str] | None:
    # Cached: lease() is the hot path and configs repeat the same few tuples.
    return None if api is None else frozenset(api)


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


class _Waiter:
    __slots__ = ("enqueued", "fut", "hints", "priority", "tenant")

    def __init__(self, fut: asyncio.Future[Servable], enqueued: float, hints: LeaseHints,
                 key: tenants.Key | None = None):
        self.fut = fut
        self.enqueued = enqueued
        self.hints = hints
        # The fair queue's grouping: one FIFO per key, keys of higher priority first.
        self.tenant = key.name if key is not None else ""
        self.priority = key.priority if key is not None else 0


class _Model:
    __slots__ = ("affinity", "cfg", "failures", "footprint", "instances", "last_error", "queue",
                 "remotes", "retry_at", "retry_handle", "sized", "vram")

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.queue: FairQueue[_Waiter] = FairQueue()
        self.instances: list[Instance] = []
        self.remotes: list[Remote] = []
        # Bytes of RAM and VRAM one instance needs: from the configured footprint or
        # the GGUF header, placed on the GPU where there is one; 0 until known.
        self.footprint = cfg.footprint or 0
        self.vram = 0
        self.sized = False
        self.affinity: OrderedDict[str, str] = OrderedDict()
        self.last_error: LoadFailed | None = None
        # Consecutive failed launches; reset by a successful one or by reset().
        self.failures = 0
        self.retry_at = 0.0
        self.retry_handle: asyncio.TimerHandle | None = None

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
        return max(self.cfg.replicas.min, 0 if self.cfg.evictable else 1)


BinaryFinder = Callable[[Path | None], Path | None]
# (a model's upstreams, the preferred one's id) -> the one to take the call, or None.
Picker = Callable[[list[Servable], str | None], Servable | None]


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
        # What the config file says; _cfg adds the dynamic models (set_dynamic_models).
        self._configured = cfg
        self._dynamic: dict[str, tuple[ModelConfig, ...]] = {}
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
        self._watcher: asyncio.Task[None] | None = None
        self._health = HealthWatch(session, cfg.scheduler.ready_check_interval,
                                   self.instances, self._unhealthy)
        # Bytes model footprints may use; None = not enforced. Set by start().
        self.memory_budget: int | None = None
        self.vram_budget: int | None = None
        # The model another was drained for: the room that frees up is its to take,
        # otherwise the drained model (whose callers queued earlier) takes it back.
        self._reserved_for: str | None = None
        # Chooses among a model's upstreams; a cluster front puts node choice here
        # (scheduler/cluster/nodes.py). Called on the event loop, must not block.
        self.pick: Picker = policy.pick_instance
        # [[providers]]: their listings become dynamic models (engines/providers.py).
        self.providers = Providers(self, session)
        # API keys: scopes, limits, usage (scheduler/tenants.py).
        self.tenants = tenants.Tenants(cfg, clock)
        self.slots = SlotCache(cfg, session)
        self._apply_models(cfg)

    # -- configuration -----------------------------------------------------------

    def _apply_models(self, cfg: CorralConfig) -> None:
        for mc in cfg.models:
            self._models[mc.name] = _Model(mc)
        self._index()

    def _index(self) -> None:
        self._names = {}
        for m in self._models.values():
            for name in (m.cfg.name, *m.cfg.aliases):
                self._names[name] = m

    @property
    def config(self) -> CorralConfig:
        """The running config: the configured models plus the dynamic ones."""
        return self._cfg

    @property
    def configured(self) -> CorralConfig:
        """The config file's contents as last applied, without dynamic models."""
        return self._configured

    def resolve(self, name: str) -> ModelConfig:
        """The model a name or alias refers to; raises UnknownModel, also for a model
        outside the calling key's scope (which is then not named in the message)."""
        return self._visible(name).cfg

    def _visible(self, name: str) -> _Model:
        m = self._names.get(name)
        key = tenants.current()
        if m is None or (key is not None and not key.may_use((m.cfg.name, *m.cfg.aliases))):
            raise UnknownModel(name, self.names())
        return m

    def balanced(self, name: str) -> bool:
        """Whether calls for this model may be spread over several upstreams (so
        prefix-affinity hints are worth computing)."""
        m = self._names.get(name)
        # The slot cache files conversations by the same prefix hash.
        return m is not None and (
            (m.cfg.replicas.max + len(m.cfg.remotes)) > 1 or self.slots.enabled(m.cfg))

    def names(self) -> list[str]:
        """Every model name and alias, in config order; those of the calling key's
        scope only."""
        key = tenants.current()
        if key is None or key.unscoped:
            return list(self._names)
        return [n for n, m in self._names.items()
                if key.may_use((m.cfg.name, *m.cfg.aliases))]

    async def apply_config(self, cfg: CorralConfig) -> dict[str, list[str]]:
        """Switch to a new config file's contents; dynamic models stay (see below)."""
        before = set(self._models)
        self._configured = cfg
        report = await self._switch(self._effective(cfg))
        await self.providers.update(cfg.providers)
        return hooks.with_provider_changes(report, before, list(self._models))

    async def set_dynamic_models(
        self, source: str, models: Iterable[ModelConfig]
    ) -> dict[str, list[str]]:
        """Replace the models one dynamic source offers (a scanned directory, a
        provider's listing, a pulled model), keyed by ``source``.

        Configured models win over dynamic ones of the same name or alias, and an
        earlier source (by name) over a later one; the result goes through the same
        path as a config change, so only what changed restarts and a model that is
        no longer offered drains and stops.
        """
        models = tuple(models)
        if models:
            self._dynamic[source] = models
        else:
            self._dynamic.pop(source, None)
        return await self._switch(self._effective(self._configured))

    def dynamic_models(self, source: str) -> tuple[ModelConfig, ...]:
        return self._dynamic.get(source, ())

    def _effective(self, cfg: CorralConfig) -> CorralConfig:
        if not self._dynamic:
            return cfg
        taken = {n for mc in cfg.models for n in (mc.name, *mc.aliases)}
        extra: list[ModelConfig] = []
        # Local files (pulled, scanned) before providers' models: a name both offer is
        # served here rather than sent away (engines/providers.py).
        for source in sorted(self._dynamic, key=lambda s: (s.startswith("provider:"), s)):
            for mc in self._dynamic[source]:
                if mc.name in taken:
                    continue
                aliases = tuple(a for a in mc.aliases if a not in taken)
                if aliases != mc.aliases:
                    mc = mc.model_copy(update={"aliases": aliases})
                taken.update((mc.name, *aliases))
                extra.append(mc)
        return cfg.model_copy(update={"models": (*cfg.models, *extra)})

    async def _switch(self, cfg: CorralConfig) -> dict[str, list[str]]:
        """Switch to a new effective config, restarting only what changed.

        Changed models drain and stop (their queued calls wait for the new launch);
        removed models drain and stop and their queued calls fail; added models are
        ready to launch. A change of [llama_server] changes every local model.
        """
        old = self._cfg
        self.tenants.configure(cfg)
        self.slots.configure(cfg)
        report: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "unchanged": []}
        binary_changed = old.llama_server != cfg.llama_server
        new_names = {mc.name for mc in cfg.models}
        for name in list(self._models):
            if name not in new_names:
                gone = self._models.pop(name)
                report["removed"].append(name)
                self._fail_waiters(gone, UnknownModel(name, sorted(new_names)))
                self._stop_all(gone, "removed")
        for mc in cfg.models:
            m = self._models.get(mc.name)
            if m is None:
                self._models[mc.name] = _Model(mc)
                report["added"].append(mc.name)
            elif m.cfg == mc and not (binary_changed and mc.local) and not (
                hooks.runtime_changed(old, cfg, mc)
            ):
                report["unchanged"].append(mc.name)
            else:
                report["changed"].append(mc.name)
                # Restarted for [llama_server] alone: its conversations are worth saving.
                reason = "reload" if m.cfg == mc else "config"
                m.cfg = mc
                m.footprint, m.vram, m.sized = mc.footprint or 0, 0, False
                m.failures, m.retry_at, m.last_error = 0, 0.0, None
                self._stop_all(m, reason)
        if binary_changed:
            self._binary = None
        # Keep the config order for listings.
        self._models = {mc.name: self._models[mc.name] for mc in cfg.models}
        self._cfg = cfg
        self._index()
        await self._measure(cfg)
        self._sync_remotes()
        self._kick()
        if report["removed"]:
            # A changed model's old slots go when it next launches (slotcache).
            self._spawn(self.slots.drop_models(report["removed"]), "drop saved slots")
        return report

    async def _measure(self, cfg: CorralConfig) -> None:
        """Memory budgets and model footprints, read off the event loop."""
        from scheduler.resources import probe_system

        sc = cfg.scheduler
        info = await asyncio.to_thread(probe_system)
        if sc.memory_budget == "auto":
            self.memory_budget = max(0, info.ram_total - sc.memory_headroom)
        else:
            self.memory_budget = sc.memory_budget
        if sc.vram_budget == "auto":
            self.vram_budget = (
                sum(max(0, g.vram_total - sc.vram_headroom) for g in info.gpus)
                if info.gpus
                else None
            )
        else:
            self.vram_budget = sc.vram_budget
        for m in self._models.values():
            if m.cfg.local and not m.sized and (m.cfg.footprint or m.cfg.path is not None):
                await self._size(m)

    async def _size(self, m: _Model, path: Path | None = None) -> None:
        gpu = self.vram_budget is not None
        m.footprint, m.vram = await asyncio.to_thread(model_placement, m.cfg, gpu, path)
        m.sized = bool(m.footprint or m.vram)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        await self._measure(self._cfg)
        self._sync_remotes()
        self._reaper = asyncio.create_task(self._reap_loop(), name="corral-reaper")
        self._watcher = asyncio.create_task(self._health.run(), name="corral-health")
        self._kick()  # launch minimum replicas
        await self.providers.start(self._configured.providers)

    def _sync_remotes(self) -> None:
        interval = self._cfg.scheduler.remote_check_interval
        for m in self._models.values():
            # Keys are read here (api_key_env), at start and on every reload.
            wanted = hooks.wanted_remotes(m.cfg)
            if hooks.same_remotes(m.remotes, wanted):
                continue
            for r in m.remotes:
                self._spawn(r.stop(), f"stop {r.id}")
            m.remotes = [
                Remote(hooks.remote_id(m.cfg.name, rc), m.cfg.name, rc, slots,
                       self._on_remote_change, on_release=self._on_release, clock=self._clock,
                       key=key)
                for rc, slots, key in wanted
            ]
            for r in m.remotes:
                r.start(self._session, interval)

    async def close(self) -> None:
        """Refuse new calls, fail queued ones, drain and stop every instance."""
        self._closing = True
        await self.providers.close()
        for m in self._models.values():
            if m.retry_handle is not None:
                m.retry_handle.cancel()
        for m in self._models.values():
            self._fail_waiters(m, ShuttingDown("Corral is shutting down"))
        for loop_task in (self._reaper, self._watcher):
            if loop_task is not None:
                loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop_task
        for m in self._models.values():
            self._stop_all(m, "shutdown")
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _stop_all(self, m: _Model, reason: str) -> None:
        """Retire every local instance; remotes too unless the model stays (a config
        change re-syncs remotes by URL in _sync_remotes)."""
        for inst in list(m.instances):
            self._retire(inst, reason)
        if reason not in ("config", "reload"):
            for r in m.remotes:
                self._spawn(r.stop(), f"stop {r.id}")
            m.remotes = []

    # -- leases ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, name: str, hints: LeaseHints | None = None) -> AsyncIterator[Upstream]:
        """A slot on an upstream that serves ``name`` (or one of its fallbacks).

        Released on every exit path. Raises UnknownModel, Overloaded, LoadFailed or
        ShuttingDown; with fallbacks configured, the last model's error.
        """
        m = self._visible(name)
        if self._closing:
            raise ShuttingDown("Corral is shutting down")
        # The calling key (limits were checked per call by the proxy) picks the
        # waiter's place in the fair queue.
        async with self._lease(m, hints or LeaseHints(), tenants.current()) as up:
            yield up

    @contextlib.asynccontextmanager
    async def _lease(
        self, m: _Model, hints: LeaseHints, key: tenants.Key | None
    ) -> AsyncIterator[Upstream]:
        start = self._clock()
        # Fallbacks outside the key's scope are skipped: a scoped key never reaches
        # another model, not even this way.
        chain = [m, *(self._names[f] for f in m.cfg.fallbacks if f in self._names
                      and (key is None or key.may_use((f,))))]
        inst: Servable | None = None
        serving = m
        for i, serving in enumerate(chain):
            try:
                inst = await self._acquire(serving, hints, start, key)
                break
            except (LoadFailed, Overloaded) as e:
                if i == len(chain) - 1:
                    raise
                log.warning("model '%s' cannot serve (%s); falling back to '%s'",
                            serving.cfg.name, e.message.splitlines()[0], chain[i + 1].cfg.name)
        assert inst is not None
        try:
            if hints.affinity and isinstance(inst, Instance) and self.slots.enabled(serving.cfg):
                await self.slots.restore(inst, hints.affinity)
            yield self._granted(serving, inst, hints, start)
        finally:
            inst.release()

    def _granted(self, m: _Model, inst: Servable, hints: LeaseHints, start: float) -> Upstream:
        if hints.affinity:
            self._remember(m, hints.affinity, inst.id)
        if hints.keep_alive is not None:
            inst.ttl_override = hints.keep_alive
        return Upstream(inst.base_url, inst.id, m.cfg.name, self._clock() - start,
                        _apis(m.cfg.api) if inst.apis is None else inst.apis, inst.egress)

    def lease_now(self, name: str, hints: LeaseHints) -> tuple[Upstream, Servable] | None:
        """``lease()``'s fast path as a plain call, for a lease held across processes.

        A free slot on a ready upstream of ``name`` itself, taken now; the caller gives
        it back with ``release()`` on the servable, on every exit path. None when the
        call would wait, fall back, fail or restore a slot: then ``lease()`` decides.
        """
        m = self._names.get(name)
        if m is None or self._closing or m.queue:
            return None
        if hints.affinity and self.slots.enabled(m.cfg):
            return None
        preferred = m.affinity.get(hints.affinity) if hints.affinity else None
        inst = self.pick(m.servables(), preferred)
        if inst is None or not inst.try_acquire():
            return None
        return self._granted(m, inst, hints, self._clock()), inst

    async def _acquire(
        self, m: _Model, hints: LeaseHints, start: float, key: tenants.Key | None = None
    ) -> Servable:
        if not m.queue:
            # The fast path: no future, no task, no snapshot.
            preferred = m.affinity.get(hints.affinity) if hints.affinity else None
            inst = self.pick(m.servables(), preferred)
            if inst is not None and inst.try_acquire():
                return inst
        if m.unavailable and not any(r.state is State.READY for r in m.remotes):
            raise m.last_error or LoadFailed(m.cfg.name, "unavailable")
        return await self._wait(m, hints, start, key)

    async def _wait(
        self, m: _Model, hints: LeaseHints, start: float, key: tenants.Key | None = None
    ) -> Servable:
        sc = self._cfg.scheduler
        if len(m.queue) >= sc.queue_size and sc.queue_size > 0:
            # A flood fills only its own share: the biggest backlog's newest call
            # makes way for a key with fewer calls waiting (scheduler/queueing.py).
            pushed = m.queue.push_out(key.name if key is not None else "")
            if pushed is not None and not pushed.fut.done():
                pushed.fut.set_exception(Overloaded(
                    f"model '{m.cfg.name}' has {len(m.queue) + 1} calls waiting (queue_size "
                    f"{sc.queue_size}); this key's share is full, try again later",
                    retry_after=self._retry_after(m)))
        if len(m.queue) >= sc.queue_size:
            self.events.waited(m.cfg.name, 0.0, "full")
            raise Overloaded(
                f"model '{m.cfg.name}' has {len(m.queue)} calls waiting (queue_size "
                f"{sc.queue_size}); try again later",
                retry_after=self._retry_after(m),
            )
        fut: asyncio.Future[Servable] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(fut, start, hints, key)
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

    async def upstream_failed(self, instance_id: str, reason: str, connect: bool) -> bool:
        """The proxy got no answer from an upstream it was leased. May the call be
        sent again?

        A local child that exited (noticed within a second) is already being
        replaced: yes. One that refuses connections but lives is wedged: it is
        retired and relaunched, and yes. A remote that refuses connections leaves the
        rotation until its next good check: yes. A remote that reset an open
        connection may have done the work: no.
        """
        for m in self._models.values():
            for r in m.remotes:
                if r.id == instance_id:
                    if connect:
                        r.mark_failed(reason)
                    return connect
        inst = self._instance(instance_id)
        if inst is None:
            return True  # already failed or stopped and gone from the books
        if await inst.wait_exit(1.0):
            return True
        if connect:
            log.warning("instance %s unreachable (%s): replacing it", inst.id, reason)
            self._retire(inst, "unreachable")
        return connect

    def upstream_answered(self, instance_id: str, status: int, retry_after: str | None) -> None:
        """An upstream answered a rate limit or a server error: a remote that is never
        probed learns from it (engines/remote.py); anything else ignores it."""
        for r in self.remotes():
            if r.id == instance_id:
                r.answered(status, retry_after)

    async def suspect(self, instance_id: str, reason: str) -> None:
        """A call to this upstream tripped a time limit: check it at once. A silent
        local child is retired (and relaunched by policy); a silent remote leaves the
        rotation until its next good check."""
        for m in self._models.values():
            for r in m.remotes:
                if r.id == instance_id:
                    await r.suspect(self._session, reason)
                    return
        inst = self._instance(instance_id)
        if inst is not None:
            await self._health.suspect(inst, reason)

    def _unhealthy(self, inst: Instance, reason: str) -> None:
        log.warning("instance %s is wedged (%s): replacing it", inst.id, reason)
        self.events.stopped(inst.model, "unhealthy")
        # No drain: its calls are stuck with it.
        self._retire(inst, "unhealthy", drain=False)

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
            (m for m in self._models.values() if m.queue),
            # Model priority, then the key priority of the call it would serve next.
            key=lambda m: (-m.cfg.priority, -m.queue[0].priority, _oldest(m)),
        )
        for m in waiting:
            while m.queue:
                w = m.queue[0]
                if w.fut.done():
                    m.queue.popleft()
                    continue
                preferred = m.affinity.get(w.hints.affinity) if w.hints.affinity else None
                inst = self.pick(m.servables(), preferred)
                if inst is None or not inst.try_acquire():
                    break
                m.queue.popleft()
                w.fut.set_result(inst)
            if m.queue and not self._closing:
                self._grow(m)
        if self._closing:
            return
        for m in self._models.values():
            if not m.queue and m.cfg.local:
                self._keep_warm(m)

    def _keep_warm(self, m: _Model) -> None:
        """Launch toward the minimum replicas (all at once), or add one when every
        ready replica is above max_load. Only into free room: nothing is evicted."""
        for _ in range(m.cfg.replicas.max):
            if not self._warm_one(m):
                return

    def _warm_one(self, m: _Model) -> bool:
        if m.failures or m.alive() >= m.cfg.replicas.max:
            return False
        ready = [i for i in m.instances if i.state is State.READY]
        starting = sum(1 for i in m.instances if i.state is State.STARTING)
        # Draining replicas are leaving: only ready and starting ones keep the minimum.
        if len(ready) + starting < m.min_replicas:
            pass
        elif starting:
            return False  # a scale-out launch is on its way
        elif not ready or any(i.load < self._cfg.scheduler.max_load for i in ready):
            return False
        decision = policy.plan_launch(self._snapshot(), m.cfg.name, m.footprint, m.vram)
        if isinstance(decision, policy.Launch) and decision.now:
            self._launch(m)
            return True
        return False

    def _grow(self, m: _Model) -> None:
        """Start (or make room for) another instance of ``m`` if none is on its way."""
        if not m.cfg.local:
            if m.remotes and all(r.state is State.FAILED for r in m.remotes):
                self._fail_waiters(m, hooks.remotes_down(m.cfg.name, m.remotes))
            return
        if any(i.state is State.STARTING for i in m.instances):
            return  # join the launch in progress
        reserved = self._reserved_for
        if reserved is not None and reserved != m.cfg.name:
            r = self._models.get(reserved)
            if r is not None and r.queue:
                return
            self._reserved_for = None
        if m.unavailable:
            self._fail_waiters(m, m.last_error or LoadFailed(m.cfg.name, "unavailable"))
            return
        now = self._clock()
        if now < m.retry_at:
            if m.retry_handle is None:
                loop = asyncio.get_running_loop()
                m.retry_handle = loop.call_later(m.retry_at - now, self._retry, m)
            return
        decision = policy.plan_launch(self._snapshot(), m.cfg.name, m.footprint, m.vram)
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
        if self._reserved_for == m.cfg.name:
            self._reserved_for = None
        self._launch(m)

    def _retry(self, m: _Model) -> None:
        m.retry_handle = None
        self._kick()

    def _maybe_preempt(self, m: _Model) -> None:
        # A hot model must not starve a waiting one: after half the queue timeout the
        # least recently used instance of another model stops taking calls, finishes
        # the ones it runs, and yields its room.
        waited = self._clock() - _oldest(m)
        if waited < self._cfg.scheduler.queue_timeout / 2:
            return
        snap = self._snapshot()
        if any(i.state in (State.DRAINING, State.STOPPING) for i in snap.instances):
            return
        victim = policy.preempt(snap, m.cfg.name, m.cfg.priority)
        inst = self._instance(victim) if victim else None
        if inst is not None:
            log.info("draining %s: %s has waited %.1f s", inst.id, m.cfg.name, waited)
            self._reserved_for = m.cfg.name
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
                        vram=i.vram,
                        ttl=ttl if i.ttl_override is None else i.ttl_override,
                        evictable=m.cfg.evictable,
                        priority=m.cfg.priority,
                    )
                )
        return policy.Snapshot(
            now=now,
            instances=views,
            max_instances=self._cfg.scheduler.max_instances,
            memory_budget=self.memory_budget,
            vram_budget=self.vram_budget,
            replicas={n: (m.min_replicas, m.cfg.replicas.max) for n, m in self._models.items()},
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
            on_release=self._on_release,
            footprint=m.footprint,
            vram=m.vram,
            log_lines=self._cfg.scheduler.log_lines,
            clock=self._clock,
        )
        m.instances.append(inst)
        self._spawn(self._run_launch(m, inst), f"launch {iid}")
        return inst

    async def _prepare(self, m: _Model) -> LaunchSpec:
        runtime = hooks.runtime_of(self._cfg, m.cfg)
        if not runtime.llama_server:
            # Another server command: a file only if the model names one.
            model_file = await self._files.get(m.cfg) if m.cfg.has_file else None
            if model_file is not None and not m.sized:
                await self._size(m, model_file)
            return hooks.runtime_spec(self._cfg, m.cfg, runtime, model_file)
        if runtime.binary is None and self._binary is None:
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
        # Another llama-server build ([runtimes.NAME] binary = ...) or the one found.
        binary = runtime.binary or self._binary
        assert binary is not None
        model_file = await self._files.get(m.cfg)
        if not m.sized:
            # A packaged or downloaded model's file exists only now: size it for the
            # next decisions.
            await self._size(m, model_file)
        # A projector named in the model's Hugging Face repo is downloaded here.
        launch_cfg = await asyncio.to_thread(with_local_files, m.cfg)
        spec = build_spec(self._cfg, launch_cfg, binary, model_file)
        spec = hooks.llama_server_spec(spec, self._cfg, m.cfg, runtime)
        return await self.slots.launch_spec(spec, m.cfg, model_file)

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
            log.error("%s", err.detail)
            self.events.launched(m.cfg.name, self._clock() - inst.stats.launched_at, False)
            m.last_error = err
            # The calls waiting for this launch fail now, with the child's last words,
            # instead of timing out in the queue, unless another upstream of the model
            # can still take them: they wait for it (within their queue timeout).
            if not self._others_can_serve(m, inst):
                self._fail_waiters(m, err)
        else:
            m.last_error = None
            m.failures = 0
            self.events.launched(m.cfg.name, inst.stats.load_seconds, True)
            log.info("instance %s ready in %.2f s", inst.id, inst.stats.load_seconds)
        finally:
            self._kick()

    def _others_can_serve(self, m: _Model, failed: Instance) -> bool:
        """Whether a replica other than ``failed`` is ready or starting, or a remote is
        ready: the queue can wait for it instead of failing with this launch."""
        return any(i is not failed and i.state in (State.READY, State.STARTING)
                   for i in m.instances) or any(r.state is State.READY for r in m.remotes)

    def _retire(self, inst: Instance, reason: str, *, drain: bool = True) -> None:
        """Drain and stop an instance in the background (idempotent)."""
        if inst.state in (State.STOPPING, State.STOPPED) or (
            drain and inst.state is State.DRAINING
        ):
            return
        if reason != "unhealthy":
            self.events.stopped(inst.model, reason)
        inst.drain()
        sc = self._cfg.scheduler
        grace = sc.drain_timeout if drain else 0.0
        m = self._models.get(inst.model)
        # Conversations survive the swap: their slots are saved once it has drained.
        save = drain and reason in SAVE_REASONS and m is not None and self.slots.enabled(m.cfg)
        self._spawn(inst.stop(grace, sc.stop_timeout,
                              (lambda: self.slots.save(inst)) if save else None),
                    f"stop {inst.id}")

    def _on_release(self, inst: Servable) -> None:
        # A freed slot matters only to queued callers (a waiting model's eviction
        # included): skip the dispatcher on the hot path when nobody waits.
        if not self._closing and any(m.queue for m in self._models.values()):
            self._kick()

    def _on_change(self, inst: Instance) -> None:
        if inst.state in (State.STOPPED, State.FAILED):
            self.slots.forget(inst.id)
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

    def wake(self) -> None:
        """Something the scheduler does not own changed (a cluster node reported):
        hand out queued slots again."""
        if not self._closing:
            self._kick()

    def _on_remote_change(self, remote: Remote) -> None:
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
        """Every local instance; those of the calling key's scope only."""
        key = tenants.current()
        return [i for m in self._models.values()
                if key is None or key.may_use((m.cfg.name, *m.cfg.aliases))
                for i in m.instances]

    def remotes(self) -> list[Remote]:
        return [r for m in self._models.values() for r in m.remotes]

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
                    "origin": m.cfg.origin,
                    "state": state,
                    "queued": len(m.queue),
                    "instances": [i.describe() for i in m.servables()],
                    "footprint_bytes": m.footprint,
                    "vram_bytes": m.vram,
                    "replicas": {"min": m.cfg.replicas.min, "max": m.cfg.replicas.max},
                    "fallbacks": list(m.cfg.fallbacks),
                    "last_error": m.last_error.detail if m.last_error else None,
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

"""Scheduler.lease(): which instance serves this call now.

The Scheduler is assembled from parts, one concern each (scheduler/scheduling/core.py says how):
leasing.py, dispatch.py, launching.py, and here configuration, lifecycle and status;
state.py holds the data they share.

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
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from scheduler.aio import cancel_and_wait
from scheduler.config.policy import policy_only, variant_names
from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.engines import hooks
from scheduler.engines.remote import Remote
from scheduler.errors import (
    ShuttingDown,
    UnknownModel,
)
from scheduler.keys import tenants
from scheduler.models.sources import model_size
from scheduler.process.instance import ALIVE, Instance, State
from scheduler.scheduling import contexts, loadcost
from scheduler.scheduling.core import Core, default_finder
from scheduler.scheduling.dispatch import Dispatch
from scheduler.scheduling.launching import Launching
from scheduler.scheduling.leasing import Leasing
from scheduler.scheduling.scaling import Scaling
from scheduler.scheduling.state import (
    MAX_LAUNCH_FAILURES,
    BinaryFinder,
    Events,
    LeaseHints,
    ModelState,
    NoEvents,
    Servable,
    Upstream,
    launch_backoff,
)

# Imported from here by the proxy and the tests: the scheduler's public names.
__all__ = ["MAX_LAUNCH_FAILURES", "BinaryFinder", "Events", "LeaseHints", "NoEvents",
           "Scheduler", "Servable", "Upstream", "default_finder", "launch_backoff"]


class Scheduler(Leasing, Dispatch, Scaling, Launching, Core):
    """Leases, dispatch, launches and the config they run from (module docstring)."""

    # -- configuration -----------------------------------------------------------

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

    def balanced(self, name: str) -> bool:
        """Whether calls for this model may be spread over several upstreams (so
        a call's chain of prefixes is worth computing)."""
        m = self._names.get(name)
        # The slot cache files conversations by the same chain.
        return m is not None and (
            (m.max_replicas + len(m.cfg.remotes)) > 1 or self.slots.enabled(m.cfg))

    async def apply_config(self, cfg: CorralConfig) -> dict[str, list[str]]:
        """Switch to a new config file's contents; dynamic models stay (see below)."""
        before = set(self._models)
        self._configured = cfg
        async with self._switching:
            report = await self._switch(self._effective(self._configured))
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
        async with self._switching:
            return await self._switch(self._effective(self._configured))

    def dynamic_models(self, source: str) -> tuple[ModelConfig, ...]:
        return self._dynamic.get(source, ())

    def _effective(self, cfg: CorralConfig) -> CorralConfig:
        if not self._dynamic:
            return cfg
        taken = {n for mc in cfg.models
                 for n in (mc.name, *mc.aliases, *variant_names(mc.variants))}
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
                self._models[mc.name] = ModelState(mc)
                report["added"].append(mc.name)
            elif m.cfg == mc and not (binary_changed and mc.local) and not (
                hooks.runtime_changed(old, cfg, mc)
            ):
                report["unchanged"].append(mc.name)
            elif (policy_only(m.cfg, mc) and not (binary_changed and mc.local)
                  and not hooks.runtime_changed(old, cfg, mc)):
                # Request policy, variants, listing: what calls carry and which names
                # exist, not what runs. The instances keep running; the new rules hold
                # from the next call (_index).
                report["changed"].append(mc.name)
                m.cfg = mc
            else:
                report["changed"].append(mc.name)
                # Restarted for [llama_server] alone: its conversations are worth saving.
                reason = "reload" if m.cfg == mc else "config"
                m.cfg = mc
                m.footprint, m.vram, m.sized = mc.footprint or 0, 0, False
                m.size, m.ctx = None, None
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
        from scheduler.models.resources import probe_system

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
        for m in list(self._models.values()):
            if m.cfg.local and not m.sized and (m.cfg.footprint or m.cfg.path is not None):
                await self._size(m, plan=False)
        self._plan_contexts()

    async def _size(self, m: ModelState, path: Path | None = None, plan: bool = True) -> None:
        m.size = await asyncio.to_thread(model_size, m.cfg, path)
        m.sized = m.size is not None or bool(m.cfg.footprint)
        if plan:
            self._plan_contexts()

    def _plan_contexts(self) -> None:
        """Each sized model's default and maximum context (contexts.plan), and its
        footprint at the default."""
        gpu = self.vram_budget is not None
        max_ctx = self._cfg.scheduler.max_ctx
        sizers = [contexts.sizer(m.cfg, m.size, gpu, max_ctx, m.min_replicas)
                  for m in self._models.values() if m.cfg.local and m.sized]
        planned = contexts.plan(sizers, self.memory_budget, self.vram_budget)
        for name, ctx in planned.items():
            m = self._models[name]
            m.ctx = ctx
            m.footprint, m.vram = self._placement(m, ctx.default)

    def contexts(self, name: str) -> contexts.Contexts | None:
        """A model's default and maximum context per slot; None until its file has
        been read (a packaged model's, at its first launch) or for a remote."""
        m = self._names.get(name)
        return None if m is None else m.ctx

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
                await cancel_and_wait(loop_task)
        for m in self._models.values():
            self._stop_all(m, "shutdown")
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _stop_all(self, m: ModelState, reason: str) -> None:
        """Retire every local instance; remotes too unless the model stays (a config
        change re-syncs remotes by URL in _sync_remotes)."""
        for inst in list(m.instances):
            self._retire(inst, reason)
        if reason not in ("config", "reload"):
            for r in m.remotes:
                self._spawn(r.stop(), f"stop {r.id}")
            m.remotes = []

    # -- views -------------------------------------------------------------------

    def loaded(self, name: str) -> list[Instance]:
        m = self._names.get(name)
        return [] if m is None else [i for i in m.instances if i.state in ALIVE]

    def loading(self) -> frozenset[str]:
        """The names and aliases of the models with an instance starting now (the
        loading feedback of a waiting call says "loading")."""
        return frozenset(name for name, m in self._names.items()
                         if any(i.state is State.STARTING for i in m.instances))

    def load_estimate(self, name: str) -> tuple[float | None, float | None]:
        """(the median seconds a load of this model takes, None when never measured;
        the seconds its oldest launch under way has run, None when none is). The wait
        shown to clients and operators (scheduler/scheduling/loadcost.py)."""
        m = self._names.get(name)
        if m is None:
            return None, None
        starting = [i.stats.launched_at for i in m.instances if i.state is State.STARTING]
        # launched_at is 0.0 until the launch task has run: it has only just begun.
        elapsed = (max(0.0, self._clock() - min(t or self._clock() for t in starting))
                   if starting else None)
        return m.load_times.median, elapsed

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
            expected, elapsed = self.load_estimate(m.cfg.name)
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
                    # The config's ctx_size, what a launch gets, the most a call can.
                    "ctx_size": m.cfg.ctx_size,
                    "context": m.ctx.default if m.ctx else None,
                    "max_context": m.ctx.maximum if m.ctx else None,
                    "replicas": {"min": m.cfg.replicas.min, "max": m.cfg.replicas.max,
                                 "wanted": m.scale},
                    "fallbacks": list(m.cfg.fallbacks),
                    "last_error": m.last_error.detail if m.last_error else None,
                    "failures": m.failures,
                    # Request policy and variants (scheduler/config/policy.py).
                    "unlisted": m.cfg.unlisted,
                    "request": m.cfg.request.model_dump(mode="json", exclude_defaults=True),
                    "variants": [v.model_dump(mode="json", exclude_defaults=True)
                                 for v in m.cfg.variants],
                    # The median of its last loads, and the launch under way if any.
                    "load_seconds_median": None if expected is None else round(expected, 3),
                    "restore_seconds_median": (None if m.restore_times.median is None
                                               else round(m.restore_times.median, 3)),
                    "loading": None if elapsed is None else {
                        "elapsed_seconds": round(elapsed, 3),
                        "remaining_seconds": round(loadcost.remaining(expected, elapsed), 3),
                        "progress": loadcost.progress(expected, elapsed),
                    },
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
            raise UnknownModel(name, self.names())
        m.failures = 0
        m.retry_at = 0.0
        m.last_error = None

    async def unload(self, name: str) -> int:
        """Drain and stop every instance of a model; returns how many."""
        m = self._names.get(name)
        if m is None:
            raise UnknownModel(name, self.names())
        insts = [i for i in m.instances if i.state in ALIVE]
        # Replicas asked for at runtime go with it, or they would be launched again.
        m.scale = None
        for inst in insts:
            self._retire(inst, "unload")
        return len(insts)

    # -- API keys' limits ---------------------------------------------------------
    # What the proxy calls once per call with a key (scheduler/keys/tenants.py). Here on the
    # scheduler so that a worker process asks the owner, who counts every process's
    # calls (scheduler/ipc/owner.py): a key's limits hold across workers.

    def admitted(self, key: tenants.Key) -> AbstractAsyncContextManager[None]:
        """A call of ``key`` counted in while it runs (``async with``); RateLimited over
        a limit."""
        return tenants.Admitted(self.tenants, key)

    def charge(self, key: tenants.Key, tokens: int) -> None:
        """Tokens a finished call of ``key`` used."""
        self.tenants.charge(key, tokens)

"""Launching and retiring instances: the launch task (spec, engine hooks, health), a
retired instance's drain and stop, what an instance's state change sets off, and the
reaper that stops what is idle past its ttl.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from scheduler.config.root import ModelConfig
from scheduler.engines import hooks
from scheduler.engines.remote import Remote
from scheduler.errors import (
    BinaryNotFound,
    CorralError,
    LoadFailed,
)
from scheduler.models.sources import with_local_files
from scheduler.process.instance import Instance, LaunchSpec, State
from scheduler.process.launcher import build_spec
from scheduler.process.slotcache import SAVE_REASONS
from scheduler.scheduling import policy
from scheduler.scheduling.core import Core, log
from scheduler.scheduling.state import ModelState, Servable, launch_backoff


class Launching(Core):
    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _launch(self, m: ModelState, ctx: int = 0) -> Instance:
        """A new instance of ``m`` with ``ctx`` tokens per slot (0: the model's default,
        known once its file has been read)."""
        iid = f"{m.cfg.name}#{next(self._ids)}"
        ctx = ctx or (m.ctx.default if m.ctx else 0)
        footprint, vram = self._placement(m, ctx)
        inst = Instance(
            iid,
            m.cfg.name,
            m.cfg.parallel,
            self._on_change,
            on_release=self._on_release,
            footprint=footprint,
            vram=vram,
            log_lines=self._cfg.scheduler.log_lines,
            clock=self._clock,
            ctx=ctx,
        )
        m.instances.append(inst)
        self._spawn(self._run_launch(m, inst), f"launch {iid}")
        return inst

    def _sized_launch(self, m: ModelState, inst: Instance) -> ModelConfig:
        """The model's config as this instance is launched: with the context planned for
        it, known by now (a packaged model's file has just been read)."""
        if inst.ctx == 0 and m.ctx is not None:
            inst.ctx = m.ctx.default
            inst.footprint, inst.vram = self._placement(m, inst.ctx)
        return m.cfg.model_copy(update={"ctx_size": inst.ctx}) if inst.ctx else m.cfg

    async def _prepare(self, m: ModelState, inst: Instance) -> LaunchSpec:
        runtime = hooks.runtime_of(self._cfg, m.cfg)
        if not runtime.llama_server:
            # Another server command: a file only if the model names one.
            model_file = await self._files.get(m.cfg) if m.cfg.has_file else None
            if model_file is not None and m.size is None:
                await self._size(m, model_file)
            return hooks.runtime_spec(self._cfg, self._sized_launch(m, inst), runtime,
                                      model_file)
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
        if m.size is None:
            # A packaged or downloaded model's file exists only now: size it for the
            # next decisions.
            await self._size(m, model_file)
        # A projector named in the model's Hugging Face repo is downloaded here.
        launch_cfg = await asyncio.to_thread(with_local_files, self._sized_launch(m, inst))
        spec = build_spec(self._cfg, launch_cfg, binary, model_file)
        spec = hooks.llama_server_spec(spec, self._cfg, m.cfg, runtime)
        return await self.slots.launch_spec(spec, m.cfg, model_file)

    async def _run_launch(self, m: ModelState, inst: Instance) -> None:
        try:
            await inst.start(self._session, lambda: self._prepare(m, inst))
        except CorralError as e:
            if inst.id in self._cancelled:
                # Stopped on purpose (_retire); a cancel has answered its waiters with
                # LoadCancelled already (Scaling.cancel_launch).
                self._cancelled.discard(inst.id)
                log.info("launch of %s stopped before it was ready", inst.id)
                return
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
            m.load_times.add(inst.stats.load_seconds)
            self.events.launched(m.cfg.name, inst.stats.load_seconds, True)
            log.info("instance %s ready in %.2f s", inst.id, inst.stats.load_seconds)
        finally:
            self._kick()

    def _others_can_serve(self, m: ModelState, failed: Instance) -> bool:
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
            if inst.state is State.STARTING:
                # Stopped on purpose (unload, config change, cancel): its end is no
                # launch failure, and the calls waiting for it wait for the next one
                # rather than fail with "stopped while loading".
                self._cancelled.add(inst.id)
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
                if (inst.state is State.FAILED and not inst.stats.ready_at
                        and inst.id not in self._cancelled):
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

    def _fail_waiters(self, m: ModelState, error: CorralError) -> None:
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

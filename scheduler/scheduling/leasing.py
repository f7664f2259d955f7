"""Leases: a slot on an upstream for one call, taken at once or after a wait in the
model's fair queue, released on every exit path; and what a call reports back about
its upstream (a failure, a 503, a suspected hang).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from scheduler.errors import (
    CorralError,
    LoadFailed,
    Overloaded,
    ShuttingDown,
)
from scheduler.keys import tenants
from scheduler.process.instance import Instance, State
from scheduler.scheduling import contexts
from scheduler.scheduling.core import Core, log
from scheduler.scheduling.state import (
    AFFINITY_ENTRIES,
    LeaseHints,
    ModelState,
    Servable,
    Upstream,
    Waiter,
    api_set,
)


class Leasing(Core):
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
        self, m: ModelState, hints: LeaseHints, key: tenants.Key | None
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

    def _granted(self, m: ModelState, inst: Servable, hints: LeaseHints, start: float) -> Upstream:
        if hints.affinity:
            self._remember(m, hints.affinity, inst.id)
        if hints.keep_alive is not None:
            inst.ttl_override = hints.keep_alive
        return Upstream(inst.base_url, inst.id, m.cfg.name, self._clock() - start,
                        api_set(m.cfg.api) if inst.apis is None else inst.apis, inst.egress,
                        contexts.context_of(inst))

    def lease_now(self, name: str, hints: LeaseHints) -> tuple[Upstream, Servable] | None:
        """``lease()``'s fast path as a plain call, for a lease held across processes.

        A free slot on a ready upstream of ``name`` itself, taken now; the caller gives
        it back with ``release()`` on the servable, on every exit path. None when the
        call would wait, fall back, fail or restore a slot: then ``lease()`` decides.
        """
        m = self._names.get(name)
        if m is None or self._closing or (hints.affinity and self.slots.enabled(m.cfg)):
            return None
        inst = self._take_free(m, hints)
        return None if inst is None else (self._granted(m, inst, hints, self._clock()), inst)

    def _take_free(self, m: ModelState, hints: LeaseHints) -> Servable | None:
        """The fast path: a free slot now when nobody queues (no future, no task, no
        snapshot); the affinity's upstream preferred."""
        if m.queue:
            return None
        preferred = m.affinity.get(hints.affinity) if hints.affinity else None
        servables = m.servables()
        if hints.need_ctx or hints.want_ctx:
            servables = contexts.fitting(servables, self._need(m, hints))
        inst = self.pick(servables, preferred)
        return inst if inst is not None and inst.try_acquire() else None

    async def _acquire(
        self, m: ModelState, hints: LeaseHints, start: float, key: tenants.Key | None = None
    ) -> Servable:
        if (err := self._too_long(m, self._need(m, hints))) is not None:
            raise err
        if (inst := self._take_free(m, hints)) is not None:
            return inst
        if m.unavailable and not any(r.state is State.READY for r in m.remotes):
            raise m.last_error or LoadFailed(m.cfg.name, "unavailable")
        return await self._wait(m, hints, start, key)

    async def _wait(
        self, m: ModelState, hints: LeaseHints, start: float, key: tenants.Key | None = None
    ) -> Servable:
        sc = self._cfg.scheduler
        if len(m.queue) >= sc.queue_size and sc.queue_size > 0:
            # A flood fills only its own share: the biggest backlog's newest call
            # makes way for a key with fewer calls waiting (scheduler/scheduling/queueing.py).
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
        waiter = Waiter(fut, start, hints, key)
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

    def _retry_after(self, m: ModelState) -> float:
        # A rough hint: the time a load takes, or a second when something is loaded.
        loading = any(i.state is State.STARTING for i in m.instances)
        return 5.0 if loading or not m.instances else 1.0

    def _remember(self, m: ModelState, key: str, instance_id: str) -> None:
        m.affinity[key] = instance_id
        m.affinity.move_to_end(key)
        if len(m.affinity) > AFFINITY_ENTRIES:
            m.affinity.popitem(last=False)

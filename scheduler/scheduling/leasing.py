"""Leases: a slot on an upstream for one call, taken at once or after a wait in the
model's fair queue, released on every exit path; and what a call reports back about
its upstream (a failure, a 503, a suspected hang).
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from types import TracebackType

from scheduler.errors import (
    CorralError,
    LoadFailed,
    Overloaded,
    ShuttingDown,
)
from scheduler.keys import tenants
from scheduler.process.instance import Instance, State
from scheduler.scheduling import contexts, loadcost
from scheduler.scheduling.core import Core, log
from scheduler.scheduling.prefixes import Chain, PrefixIndex
from scheduler.scheduling.state import (
    LeaseHints,
    ModelState,
    Servable,
    Upstream,
    Waiter,
    api_set,
)

# Seconds an upstream is left alone after a call on it ended early (Leasing.quiet):
# llama-server's one second of quiet, and a margin.
QUIET_AFTER_ABANDON = 1.5


class Leasing(Core):
    def lease(self, name: str, hints: LeaseHints | None = None
              ) -> AbstractAsyncContextManager[Upstream]:
        """A slot on an upstream that serves ``name`` (or one of its fallbacks), for
        ``async with``.

        Released on every exit path. Raises UnknownModel, Overloaded, LoadFailed or
        ShuttingDown; with fallbacks configured, the last model's error.
        """
        return Lease(self, name, hints)

    async def _leased(self, name: str, hints: LeaseHints | None
                      ) -> tuple[Upstream, Servable, int | None]:
        """Lease's way in: the upstream, what to release and the slot taken."""
        m = self._visible(name)
        if self._closing:
            raise ShuttingDown("Corral is shutting down")
        hints = hints or LeaseHints()
        # The calling key (limits were checked per call by the proxy) picks the
        # waiter's place in the fair queue.
        key = tenants.current()
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
        slot: int | None = None
        try:
            if hints.chain and isinstance(inst, Instance) and self.slots.enabled(serving.cfg):
                slot = await self._slot(inst, hints.chain)
            return self._granted(serving, inst, hints, start, slot), inst, slot
        except BaseException:
            self._unleased(inst, slot, failed=True)
            raise

    def _unleased(self, inst: Servable, slot: int | None, failed: bool) -> None:
        """Lease's way out, on every path."""
        try:
            if failed:
                # The call ended early (the client hung up, the upstream failed) and the
                # proxy closed its upstream connection.
                self.hush(inst.id)
        finally:
            if slot is not None and isinstance(inst, Instance):
                self.slots.release(inst, slot)
            inst.release()

    async def _slot(self, inst: Instance, chain: Chain) -> int | None:
        """The slot of ``inst`` the call runs in, made ready for it: the conversation
        it would cut short saved, the longest saved prefix of the call restored
        (scheduler/process/slotcache.py)."""
        got = self.slots.assign(inst, chain)
        if got is None:
            return None
        slot, have, displaced = got
        try:
            await self.slots.prepare(inst, slot, chain, have, displaced)
        except BaseException:
            self.slots.release(inst, slot)
            raise
        return slot

    def _granted(self, m: ModelState, inst: Servable, hints: LeaseHints, start: float,
                 slot: int | None = None) -> Upstream:
        if hints.chain:
            self._remember(m, hints.chain, inst.id)
        if hints.keep_alive is not None:
            inst.ttl_override = hints.keep_alive
        return Upstream(inst.base_url, inst.id, m.cfg.name, self._clock() - start,
                        api_set(m.cfg.api) if inst.apis is None else inst.apis, inst.egress,
                        slot=slot, ctx=contexts.context_of(inst))

    def lease_now(self, name: str, hints: LeaseHints) -> tuple[Upstream, Servable] | None:
        """``lease()``'s fast path as a plain call, for a lease held across processes.

        A free slot on a ready upstream of ``name`` itself, taken now; the caller gives
        it back with ``release()`` on the servable, on every exit path. None when the
        call would wait, fall back, fail or restore a slot: then ``lease()`` decides.
        """
        m = self._names.get(name)
        if m is None or self._closing or (hints.chain and self.slots.enabled(m.cfg)):
            return None
        inst = self._take_free(m, hints)
        return None if inst is None else (self._granted(m, inst, hints, self._clock()), inst)

    def _take_free(self, m: ModelState, hints: LeaseHints) -> Servable | None:
        """The fast path: a free slot now when nobody queues (no future, no task, no
        snapshot); the upstream holding the longest prefix of the call preferred."""
        if m.queue:
            return None
        inst = self._choose(m, hints)
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
        """The proxy got no answer from an upstream it was leased (it resends the call
        elsewhere, ``LeaseHints.avoid``). Is the upstream replaced or out of rotation?

        A local child that exited (noticed within a second) is already being
        replaced: yes. One that refuses connections but lives is wedged: it is
        retired and relaunched, and yes. One that reset a connection and lives is
        checked now (retired if /health is silent). A remote that refused or reset a
        connection, or broke its answer, leaves the rotation until its next good check
        (a node killed under load resets its calls before it refuses new ones): yes.
        """
        for m in self._models.values():
            for r in m.remotes:
                if r.id == instance_id:
                    r.mark_failed(reason)
                    return True
        inst = self._instance(instance_id)
        if inst is None:
            return True  # already failed or stopped and gone from the books
        if await inst.wait_exit(1.0):
            return True
        if connect:
            log.warning("instance %s unreachable (%s): replacing it", inst.id, reason)
            self._retire(inst, "unreachable")
            return True
        await self._health.suspect(inst, reason)
        return inst.state is not State.READY

    def quiet(self, instance_id: str) -> bool:
        """Whether Corral should leave this upstream alone for now (no /metrics read):
        a call on it ended early within the last ``QUIET_AFTER_ABANDON`` seconds.

        llama-server notices that the client of a non-streaming call has gone only
        when it has waited a whole second for results without any (any task's: a
        /metrics or /slots read is a task too); Corral's own reads, once a second
        for the dashboard, kept it generating for nobody until ``max_tokens``.
        """
        until = self._quiet.get(instance_id)
        if until is None:
            return False
        if until > self._clock():
            return True
        del self._quiet[instance_id]
        return False

    def hush(self, instance_id: str) -> None:
        """A call on this upstream ended early: leave it alone for a while (``quiet``)."""
        now = self._clock()
        if len(self._quiet) > 64:  # entries of instances long gone
            self._quiet = {k: t for k, t in self._quiet.items() if t > now}
        self._quiet[instance_id] = now + QUIET_AFTER_ABANDON

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
        """Seconds a refused or timed-out caller is told to wait: what the load under
        way (or the one a call would start) still takes by the model's median load time
        (loadcost.remaining), or a second when an instance is up and only busy."""
        starting = [i for i in m.instances if i.state is State.STARTING]
        if starting:
            elapsed = self._clock() - min(i.stats.launched_at or self._clock()
                                          for i in starting)
            return loadcost.remaining(m.load_times.median, elapsed)
        if not m.instances and m.cfg.local:
            return loadcost.remaining(m.load_times.median, 0.0)
        return 1.0

    def _remember(self, m: ModelState, chain: Chain, upstream_id: str) -> None:
        index = m.prefixes.get(upstream_id)
        if index is None:
            # A new upstream: forget those that are gone (ids are never reused).
            live = {s.id for s in m.servables()}
            for gone in [i for i in m.prefixes if i not in live]:
                del m.prefixes[gone]
            index = m.prefixes[upstream_id] = PrefixIndex()
        index.add(chain)


class Lease:
    """``Leasing.lease()``'s context manager: a class, as it runs on every call (an
    ``asynccontextmanager`` costs an async generator and its hooks each time)."""

    __slots__ = ("_held", "_hints", "_leasing", "_name")

    def __init__(self, leasing: Leasing, name: str, hints: LeaseHints | None) -> None:
        self._leasing = leasing
        self._name = name
        self._hints = hints
        self._held: tuple[Servable, int | None] | None = None

    async def __aenter__(self) -> Upstream:
        up, inst, slot = await self._leasing._leased(self._name, self._hints)
        self._held = (inst, slot)
        return up

    async def __aexit__(self, kind: type[BaseException] | None, err: BaseException | None,
                        tb: TracebackType | None) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._leasing._unleased(*held, failed=kind is not None)

"""The dispatcher: ``_kick()``, the one place that hands queued calls their slots and
decides launches, replicas, warm spares, retries and preemption (decisions from
scheduler/scheduling/policy.py, on a snapshot of the scheduler's state).
"""

from __future__ import annotations

import asyncio

from scheduler.engines import hooks
from scheduler.errors import (
    LoadFailed,
)
from scheduler.process.instance import ALIVE, State
from scheduler.scheduling import contexts, policy
from scheduler.scheduling.core import Core, log
from scheduler.scheduling.prefixes import MIN_MATCH
from scheduler.scheduling.state import ModelState, Servable, Waiter, oldest_wait

# Calls of a key a free slot may go to ahead of its head, for a longer prefix there.
LOOKAHEAD = 8


class Dispatch(Core):
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
            key=lambda m: (-m.cfg.priority, -m.queue[0].priority, oldest_wait(m)),
        )
        for m in waiting:
            while m.queue:
                w = m.queue[0]
                if w.fut.done():
                    m.queue.popleft()
                    continue
                need = self._need(m, w.hints)
                # Its model's file was read while it waited: it may fit nothing.
                if (err := self._too_long(m, need)) is not None:
                    m.queue.popleft()
                    w.fut.set_exception(err)
                    continue
                inst = self._choose(m, w.hints)
                if inst is None or not inst.try_acquire():
                    break
                w = self._closest(m, w, inst)
                m.queue.take(w)
                w.fut.set_result(inst)
            if m.queue and not self._closing:
                self._grow(m)
        if self._closing:
            return
        for m in self._models.values():
            if not m.queue and m.cfg.local:
                self._keep_warm(m)

    def _closest(self, m: ModelState, head: Waiter, inst: Servable) -> Waiter:
        """The call that a free slot of ``inst`` goes to: among the next few calls of
        the head's key, the one whose prefix ``inst`` holds longest (at least
        ``MIN_MATCH``), so that under load a follow-up goes where its history is
        rather than wherever a slot frees first. The head is passed over at most
        ``LOOKAHEAD`` times, and other keys' turns do not change."""
        index = m.prefixes.get(inst.id)
        if index is None or head.passed >= LOOKAHEAD:
            return head
        best, best_n = head, index.match(head.hints.chain)
        room = contexts.context_of(inst)
        for w in m.queue.head_run(LOOKAHEAD):
            if w is head or w.fut.done():
                continue
            # The slot was chosen for the head's context; another call must fit it too.
            if room and self._need(m, w.hints) > room:
                continue
            n = index.match(w.hints.chain)
            if n >= MIN_MATCH and n > best_n:
                best, best_n = w, n
        if best is not head:
            head.passed += 1
        return best

    def _keep_warm(self, m: ModelState) -> None:
        """Launch toward the minimum replicas (all at once), or add one when every
        ready replica is above max_load. Only into free room: nothing is evicted."""
        for _ in range(m.max_replicas):
            if not self._warm_one(m):
                return

    def _warm_one(self, m: ModelState) -> bool:
        if m.failures or m.alive() >= m.max_replicas:
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

    def _grow(self, m: ModelState) -> None:
        """Start (or make room for) another instance of ``m`` if none is on its way."""
        if not m.cfg.local:
            if m.remotes and all(r.state is State.FAILED for r in m.remotes):
                self._fail_waiters(m, hooks.remotes_down(m.cfg.name, m.remotes))
            return
        need = self._need(m, m.queue[0].hints) if m.queue else 0
        if any(i.state is State.STARTING and contexts.fitting([i], need) for i in m.instances):
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
        size = contexts.launch_size(need, m.ctx) if need and m.ctx else 0
        if size and self._resize(m, need):
            return
        decision = policy.plan_launch(self._snapshot(), m.cfg.name, *self._placement(m, size))
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
        self._launch(m, size)

    def _resize(self, m: ModelState, need: int) -> bool:
        """A call needs more context than every instance of ``m`` has, and the model
        has its maximum of replicas: an idle one makes way (it is retired and the larger
        one launched once it has stopped), or the call waits for one to be idle. Never
        a reload under running calls. True: nothing to launch now."""
        alive = [i for i in m.instances if i.state in ALIVE]
        if len(alive) < m.max_replicas or contexts.fitting(alive, need):
            return False
        if any(i.state in (State.DRAINING, State.STOPPING) for i in alive):
            return True  # one is already making way
        idle = [i for i in alive if i.state is State.READY and i.in_flight == 0]
        if idle:
            victim = min(idle, key=lambda i: i.last_used)
            log.info("retiring %s (context %d) for a call that needs %d tokens",
                     victim.id, victim.ctx, need)
            self._retire(victim, "evicted")
        return True

    def _retry(self, m: ModelState) -> None:
        m.retry_handle = None
        self._kick()

    def _maybe_preempt(self, m: ModelState) -> None:
        # A hot model must not starve a waiting one: after half the queue timeout the
        # least recently used instance of another model stops taking calls, finishes
        # the ones it runs, and yields its room.
        waited = self._clock() - oldest_wait(m)
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
                        load_cost=m.reload_cost,
                    )
                )
        return policy.Snapshot(
            now=now,
            instances=views,
            max_instances=self._cfg.scheduler.max_instances,
            memory_budget=self.memory_budget,
            vram_budget=self.vram_budget,
            replicas={n: (m.min_replicas, m.max_replicas) for n, m in self._models.items()},
        )


"""An operator's hands on a running model: cancel a launch in progress, add or remove
one replica (admin API, Xinference's ``/replicas``; docs/admin-api.md).

A replica added or removed sets the model's ``scale`` (state.py), which the dispatcher
keeps as a minimum (launching into room as it frees) and allows past ``replicas.max``;
an unload forgets it. A replica is removed by draining it: the calls it runs finish,
new ones go to the others.
"""

from __future__ import annotations

from scheduler.errors import BadRequest, LoadCancelled, UnknownModel
from scheduler.process.instance import Instance, State
from scheduler.scheduling import policy
from scheduler.scheduling.core import Core, log
from scheduler.scheduling.state import ModelState

_UP = (State.READY, State.STARTING)


class Scaling(Core):
    def _local(self, name: str) -> ModelState:
        m = self._names.get(name)
        if m is None:
            raise UnknownModel(name, list(self._names))
        return m

    def cancel_launch(self, name: str) -> list[str]:
        """Stop every launch of ``name`` in progress: its child is killed (no drain:
        it serves nothing yet) and its room given back; the calls waiting for the
        model end with LoadCancelled unless a ready replica can take them. Returns the
        ids of the launches stopped."""
        m = self._local(name)
        starting = [i for i in m.instances if i.state is State.STARTING]
        if m.scale is not None:
            # A replica being added is one no longer wanted.
            m.scale = max(0, sum(1 for i in m.instances if i.state is State.READY))
        if not any(i.state is State.READY for i in m.instances):
            # Before the stops: their state changes kick the dispatcher, which would
            # launch again for these waiters.
            self._fail_waiters(m, LoadCancelled(m.cfg.name))
        for inst in starting:
            log.info("cancelling the launch of %s", inst.id)
            self._retire(inst, "cancelled", drain=False)
        return [i.id for i in starting]

    def scale_to(self, name: str, replicas: int) -> None:
        """Keep ``replicas`` instances of ``name`` (Xinference's ``replica``): launched
        into free room, kept past their TTL, until the model is unloaded."""
        m = self._local(name)
        if m.cfg.local:
            m.scale = max(0, replicas)
            self._kick()

    def add_replica(self, name: str) -> str | None:
        """One more instance of ``name``: launched now if it fits (the id), else once
        room frees (None): idle instances of other models are evicted for it, and with
        every instance busy the dispatcher launches it when one leaves (its TTL, an
        unload). BadRequest when it can never fit."""
        m = self._local(name)
        if not m.cfg.local:
            raise BadRequest(f"model '{m.cfg.name}' is served by remotes: it has no "
                             "local replicas to add")
        before = m.scale
        m.scale = sum(1 for i in m.instances if i.state in _UP) + 1
        decision = policy.plan_launch(self._snapshot(), m.cfg.name, m.footprint, m.vram)
        if isinstance(decision, policy.Wait):
            if decision.never or decision.reason.startswith("model '"):
                m.scale = before
                raise BadRequest(f"no replica of '{m.cfg.name}' can be added: "
                                 f"{decision.reason}")
            log.info("a replica of %s waits for room: %s", m.cfg.name, decision.reason)
            return None
        if decision.evict:
            for iid in decision.evict:
                victim = self._instance(iid)
                if victim is not None:
                    log.info("evicting %s (idle) for a replica of %s", iid, m.cfg.name)
                    self._retire(victim, "evicted")
            return None  # the dispatcher launches it once they have stopped
        return self._launch(m).id

    def remove_replica(self, name: str, instance_id: str | None = None) -> tuple[str, int]:
        """Drain and stop one instance of ``name`` (``instance_id``, else a starting
        one, else the least busy); returns its id and how many stay."""
        m = self._local(name)
        up = [i for i in m.instances if i.state in _UP]
        victim: Instance | None
        if instance_id is not None:
            victim = next((i for i in up if i.id == instance_id), None)
            if victim is None:
                raise BadRequest(f"model '{m.cfg.name}' has no running replica "
                                 f"'{instance_id}'")
        elif up:
            victim = min(up, key=lambda i: (i.state is State.READY, i.in_flight,
                                            i.last_used))
        else:
            raise BadRequest(f"model '{m.cfg.name}' has no running replica")
        m.scale = len(up) - 1
        # A starting one serves nothing yet: stopped at once (no failure, _retire).
        self._retire(victim, "scaled", drain=victim.state is not State.STARTING)
        return victim.id, len(up) - 1

"""What a node reports about itself to the fronts (the node-state API's body).

Built from the scheduler's public views on each poll; the launch verdict per model
comes from the same pure ``policy.plan_launch`` the node itself would apply, so a
front's "can launch soonest" means what the node would actually do.
"""

from __future__ import annotations

from typing import Any

from scheduler.models.capabilities import capabilities
from scheduler.process.instance import ALIVE, State
from scheduler.scheduling import policy
from scheduler.scheduling.scheduler import Scheduler

# Version of the report's shape; a front refuses a node whose version it lacks.
VERSION = 1


def node_state(scheduler: Scheduler, name: str, draining: bool, now: float) -> dict[str, Any]:
    cfg = scheduler.config
    insts = scheduler.instances()
    snap = policy.Snapshot(
        now=now,
        instances=[
            policy.InstanceView(id=i.id, model=i.model, state=i.state, in_flight=i.in_flight,
                                slots=i.slots, last_used=i.last_used, footprint=i.footprint,
                                vram=i.vram)
            for i in insts
        ],
        max_instances=cfg.scheduler.max_instances,
        memory_budget=scheduler.memory_budget,
        vram_budget=scheduler.vram_budget,
        replicas={m.name: (m.replicas.min, m.replicas.max) for m in cfg.models},
    )
    alive = [i for i in insts if i.state in ALIVE]
    used = sum(i.footprint for i in alive)
    used_vram = sum(i.vram for i in alive)
    models = []
    statuses = scheduler.model_status()
    for status in statuses:
        mname = str(status["name"])
        mc = cfg.model(mname)
        if mc is None:
            continue
        mine = [i for i in insts if i.model == mname]
        ready = [i for i in mine if i.state is State.READY]
        starting = [i for i in mine if i.state is State.STARTING]
        footprint = int(status["footprint_bytes"])  # type: ignore[call-overload]
        vram = int(status["vram_bytes"])  # type: ignore[call-overload]
        models.append({
            "name": mname,
            "aliases": list(mc.aliases),
            # Names only: a variant's params are applied here, where calls arrive under
            # the name the client used (scheduler/config/policy.py).
            "unlisted": mc.unlisted,
            "variants": [{"name": v.name, "aliases": list(v.aliases), "unlisted": v.unlisted}
                         for v in mc.variants],
            "capabilities": sorted(capabilities(mc)),
            "state": status["state"],
            "slots": mc.parallel,
            "ready_slots": sum(i.slots for i in ready),
            "starting_slots": sum(i.slots for i in starting),
            "in_flight": sum(i.in_flight for i in mine if i.state in ALIVE),
            "queued": status["queued"],
            "launch": _launch(snap, mname, footprint, vram, mc.local, str(status["state"])),
            "instances": [
                {"id": i.id, "state": str(i.state), "in_flight": i.in_flight,
                 "slots": i.slots, "load": i.load, "served": i.stats.served}
                for i in mine
            ],
        })
    budget = scheduler.memory_budget
    vbudget = scheduler.vram_budget
    return {
        "version": VERSION,
        "node": name,
        "draining": draining,
        "in_flight": sum(i.in_flight for i in alive),
        "queued": sum(int(s["queued"]) for s in statuses),  # type: ignore[call-overload]
        "instances": len(alive),
        "max_instances": cfg.scheduler.max_instances,
        "memory": {"budget": budget, "used": used,
                   "free": None if budget is None else max(0, budget - used)},
        "vram": {"budget": vbudget, "used": used_vram,
                 "free": None if vbudget is None else max(0, vbudget - used_vram)},
        "models": models,
    }


def _launch(snap: policy.Snapshot, model: str, footprint: int, vram: int, local: bool,
            state: str) -> str:
    if not local:
        # A model this node reaches through its own remotes: it never launches, the
        # remote either takes calls or not.
        return "now"
    if state == "unavailable":
        return "never"
    decision = policy.plan_launch(snap, model, footprint, vram)
    if isinstance(decision, policy.Wait):
        return "never" if decision.never else "wait"
    return "now" if decision.now else "evict"

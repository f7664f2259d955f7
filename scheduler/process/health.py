"""Health of ready instances: a child that stops answering without exiting (stopped,
deadlocked, swapped to death) must not stay in rotation holding calls forever.

Readiness polling (``Instance.start``) ends once a child is ready, and a crash is seen
by its exit; a *wedged* child shows neither. So every ready instance is asked for
``/health`` every ``ready_check_interval`` seconds. Any HTTP answer means alive (a
busy llama-server still answers); silence past the probe's timeout is a miss, and
``MISSES`` misses in a row retire the instance without draining (its calls are stuck
anyway; their connections close when it dies, and the upstream call path resends
those whose clients had received nothing). The scheduler then relaunches by its
normal policy.

``suspect()`` is the fast path: the proxy calls it when a call to an instance or a
remote tripped a time limit; one failed probe is enough then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from scheduler.process.instance import Instance, State

log = logging.getLogger(__name__)

MISSES = 2


async def answers(session: aiohttp.ClientSession, base_url: str, within: float) -> bool:
    """Whether anything answers ``/health`` within ``within`` seconds."""
    try:
        async with session.get(base_url + "/health",
                               timeout=aiohttp.ClientTimeout(total=within)):
            return True
    except (aiohttp.ClientError, TimeoutError):
        return False


class HealthWatch:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        interval: float,
        instances: Callable[[], list[Instance]],
        unhealthy: Callable[[Instance, str], None],
    ) -> None:
        self._session = session
        self._interval = interval
        self._timeout = min(2.0, interval)
        self._instances = instances
        self._unhealthy = unhealthy
        self._misses: dict[str, int] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            ready = [i for i in self._instances() if i.state is State.READY]
            await asyncio.gather(*(self._probe(i) for i in ready))
            alive = {i.id for i in ready}
            for iid in [k for k in self._misses if k not in alive]:
                del self._misses[iid]

    async def _probe(self, inst: Instance) -> None:
        if await answers(self._session, inst.base_url, self._timeout):
            self._misses.pop(inst.id, None)
            return
        misses = self._misses[inst.id] = self._misses.get(inst.id, 0) + 1
        if misses >= MISSES and inst.state is State.READY:
            self._unhealthy(inst, f"/health unanswered {misses} times in a row")

    async def suspect(self, inst: Instance, reason: str) -> None:
        """A call to ``inst`` timed out: check it now; retire it if it is silent."""
        if inst.state not in (State.READY, State.DRAINING):
            return
        if not await answers(self._session, inst.base_url, self._timeout):
            self._unhealthy(inst, f"{reason}, and /health did not answer")

"""A remote OpenAI-compatible upstream (llama-server, vLLM, SGLang, Ollama elsewhere).

It looks like an Instance to the dispatcher (id, state, in_flight, slots, last_used,
try_acquire/release), but Corral does not own its process: it is never launched,
evicted or counted against max_instances or the memory budget. A health loop takes
it out of rotation (FAILED) while it does not answer and puts it back when it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from scheduler.instance import State

log = logging.getLogger(__name__)

# Probed in order; the first that answers 200 marks the remote healthy. llama-server
# has /health, vLLM and SGLang have /health too, Ollama only answers /v1/models.
_PROBES = ("/health", "/v1/models")


class Remote:
    def __init__(
        self,
        remote_id: str,
        model: str,
        base_url: str,
        slots: int,
        on_change: Callable[[Remote], None],
        on_release: Callable[[Remote], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.id = remote_id
        self.model = model
        self.base_url = base_url
        self.slots = slots
        self.in_flight = 0
        self.served = 0
        self.failure: str | None = None
        self._clock = clock
        self.last_used = clock()
        self.ttl_override: float | None = None
        self._state = State.STARTING  # unknown until the first check answers
        self._on_change = on_change
        # A call ending is far more frequent than a state change, and only matters
        # to the scheduler when someone is queued: it may get its own callback.
        self._on_release = on_release or on_change
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def load(self) -> float:
        return self.in_flight / self.slots

    def _set(self, state: State) -> None:
        if state is not self._state:
            self._state = state
            self._on_change(self)

    def try_acquire(self) -> bool:
        if self._state is not State.READY or self.in_flight >= self.slots:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1
        self.served += 1
        self.last_used = self._clock()
        self._on_release(self)

    def mark_failed(self, reason: str) -> None:
        """A call could not reach it: out of rotation until the next good check."""
        self.failure = reason
        self._set(State.FAILED)

    def start(self, session: aiohttp.ClientSession, interval: float) -> None:
        self._task = asyncio.create_task(self._check_loop(session, interval), name=self.id)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._set(State.STOPPED)

    async def check(self, session: aiohttp.ClientSession) -> bool:
        timeout = aiohttp.ClientTimeout(total=3)
        reason = "no answer"
        for probe in _PROBES:
            try:
                async with session.get(self.base_url + probe, timeout=timeout) as resp:
                    if resp.status == 200:
                        self.failure = None
                        self._set(State.READY)
                        return True
                    reason = f"{probe} answered {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                reason = f"{probe}: {e or type(e).__name__}"
        if self._state is not State.FAILED:
            log.warning("remote %s out of rotation: %s", self.id, reason)
        self.mark_failed(reason)
        return False

    async def _check_loop(self, session: aiohttp.ClientSession, interval: float) -> None:
        while True:
            await self.check(session)
            await asyncio.sleep(interval)

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "model": self.model,
            "state": str(self._state),
            "remote": True,
            "base_url": self.base_url,
            "slots": self.slots,
            "in_flight": self.in_flight,
            "load": self.load,
            "served": self.served,
            "idle_seconds": round(self._clock() - self.last_used, 3),
            "failure": self.failure,
        }

"""What an endpoint handler gets: the app (scheduler, session, model facts) and, for
a channel, a way to send packets, to see a client's ``cancel`` and to keep the
client's timer alive.

The Python sync SDK gives up after 60 s without a message on a call or channel, so
any wait that may be long (a cold load, a long prompt evaluation) runs under
``heartbeat``: a held task that sends a progress packet whenever the channel has
been silent for ``HEARTBEAT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aiohttp import web

from scheduler.aio import cancel_and_wait

T = TypeVar("T")

# Seconds of silence on a channel before a progress packet is sent. Well inside the
# 10 s Corral promises and the Python SDK's 60 s.
HEARTBEAT_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Ctx:
    app: web.Application
    namespace: str  # "llm", "embedding", "system"


class Channel:
    """One open channel; its packets go out in the order they are sent."""

    def __init__(self, channel_id: int, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.id = channel_id
        self._send = send
        self.cancelled = asyncio.Event()
        self._last = asyncio.get_running_loop().time()

    async def send(self, message: dict[str, Any]) -> None:
        self._last = asyncio.get_running_loop().time()
        await self._send(message)

    @contextlib.asynccontextmanager
    async def heartbeat(self, packet: Callable[[float], dict[str, Any]]) -> AsyncIterator[None]:
        """While inside, send ``packet(elapsed)`` whenever the channel is silent."""
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def beat() -> None:
            while True:
                wait = self._last + HEARTBEAT_S - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                await self.send(packet(loop.time() - start))

        task = asyncio.create_task(beat(), name=f"lmstudio-sdk-heartbeat-{self.id}")
        try:
            yield
        finally:
            await cancel_and_wait(task)

    async def unless_cancelled(self, work: Coroutine[Any, Any, T]) -> tuple[T | None, bool]:
        """Run ``work`` until it ends or the client cancels: (result, cancelled).

        On cancel the work is cancelled and awaited, so whatever it held (a lease, an
        upstream response) is released before this returns.
        """
        task: asyncio.Task[T] = asyncio.create_task(work)
        waiter = asyncio.create_task(self.cancelled.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
            await asyncio.wait({task, waiter})
        if task.cancelled():
            return None, True
        return task.result(), False  # the work's own exception, if any, is raised here

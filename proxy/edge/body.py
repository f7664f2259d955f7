"""Reading request bodies: a limit per route, a budget for all ports together.

Every port shares one event loop, so a body is never read in one piece by a call
that could stall the others: aiohttp hands it over as it arrives, and it is gathered
into one ``bytearray`` (no second copy: the upstream client sends a bytearray as it
is). Bodies of a size worth counting reserve their bytes in ``BodyBudget`` first; when
the budget is spent, new big bodies wait for old ones to finish instead of driving
the process out of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from proxy.edge import jsonc
from scheduler.errors import TooLarge

# Below this a body is not worth the budget's bookkeeping: a chat call.
COUNTED = 256 << 10


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


_NOTHING: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()


class BodyBudget:
    """Bytes of request bodies held in memory at once, across every port."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Condition()

    def hold(self, size: int) -> contextlib.AbstractAsyncContextManager[None]:
        """Bytes reserved for a body of ``size`` while the block runs (nothing below
        ``COUNTED``: a shared no-op, not a generator per call)."""
        return _NOTHING if size < COUNTED else self._hold(size)

    @contextlib.asynccontextmanager
    async def _hold(self, size: int) -> AsyncIterator[None]:
        if size > self.limit:
            raise TooLarge(
                f"a {_mib(size)} body exceeds max_body_bytes_in_flight ({_mib(self.limit)})"
            )
        async with self._freed:
            # One body at a time always fits, so a lone large call never starves.
            await self._freed.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size
        try:
            yield
        finally:
            async with self._freed:
                self.used -= size
                self._freed.notify_all()


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"request body exceeds this endpoint's limit of {_mib(limit)}")


async def read(request: web.Request, limit: int) -> bytes | bytearray:
    """The whole body, refused with 413 past ``limit`` bytes (before reading any of it
    when the client declared its length)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large(limit)
    content = request.content
    if content.is_eof():
        # The whole body came with the head (a chat call does): take it as it is, no
        # loop and no copy.
        data = content.read_nowait()
        if len(data) > limit:
            raise too_large(limit)
        return data
    buf = bytearray()
    async for chunk in request.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            raise too_large(limit)
    return buf


# A translated call's body as it came, for its capture (proxy/calls/capture.py): what
# goes upstream is another body. A pass-through call sends its body as it came.
RECEIVED: web.RequestKey[bytes | bytearray] = web.RequestKey("corral_received_body")


async def read_json(request: web.Request, limit: int = 64 << 20) -> dict[str, Any]:
    """A JSON object body, parsed whole: what the translating dialects read."""
    raw = request[RECEIVED] = await read(request, limit)
    return jsonc.loads_object(raw)


def received_body(request: web.Request) -> bytes | bytearray | None:
    return request.get(RECEIVED)

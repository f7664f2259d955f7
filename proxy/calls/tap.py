"""A stand-in for an upstream answer's ``resp.content`` that sees every read the
consumer makes: the base of the taps that read an answer as it is relayed (usage
counts its tokens off the tail, a capture copies it). ``untap()`` puts the stream
back before the response is released, so aiohttp's own cleanup sees its own object."""

from __future__ import annotations

from typing import Any, cast

import aiohttp
from aiohttp.streams import AsyncStreamIterator


class ContentTap:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._inner = resp.content
        resp.content = cast(aiohttp.StreamReader, self)

    def _keep(self, data: bytes) -> bytes:
        """What a subclass does with each read; returns it unchanged."""
        return data

    async def readany(self) -> bytes:
        return self._keep(await self._inner.readany())

    async def read(self, n: int = -1) -> bytes:
        return self._keep(await self._inner.read(n))

    async def readline(self) -> bytes:
        return self._keep(await self._inner.readline())

    async def readchunk(self) -> tuple[bytes, bool]:
        data, end = await self._inner.readchunk()
        return self._keep(data), end

    def at_eof(self) -> bool:
        # Asked after every read of a relayed stream (proxy/calls/streaming.py): not
        # through __getattr__.
        return self._inner.at_eof()

    def iter_any(self) -> AsyncStreamIterator[bytes]:
        return AsyncStreamIterator(self.readany)

    def iter_chunked(self, n: int) -> AsyncStreamIterator[bytes]:
        return AsyncStreamIterator(lambda: self.read(n))

    def __aiter__(self) -> AsyncStreamIterator[bytes]:
        return AsyncStreamIterator(self.readline)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def untap(self) -> None:
        self._resp.content = self._inner

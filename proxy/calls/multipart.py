"""Multipart endpoints (audio transcriptions): find ``model`` in the form, stream the
file on.

The parts are read in order. Small fields are kept; when ``model`` has been seen
before the file (the order the OpenAI SDKs send), the call is leased and the file is
streamed to the upstream as it arrives, followed by any later fields: memory stays at
a chunk or two whatever the file's size. A file that comes before ``model`` is first
spooled to a temporary file (written from a worker thread), then sent from disk; such
a call can also be resent, a streamed one cannot.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any, Literal

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.calls import upstream
from proxy.calls.streaming import relay
from proxy.dialects.families.bridge import refuse_undeclared
from proxy.edge import body as bodies
from proxy.edge.errors import ROUTE_DIALECT, Family, family_dialect
from proxy.keys import SCHEDULER
from scheduler.config.root import Capability, ModelConfig
from scheduler.errors import BadRequest
from scheduler.scheduling.scheduler import Scheduler

Check = Callable[[Scheduler, str, Capability | None], ModelConfig]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_FIELD_LIMIT = 64 << 10
_CHUNK = 256 << 10


@dataclass(slots=True)
class _Part:
    name: str
    headers: list[tuple[str, str]]
    value: bytes = b""
    # The file: its bytes come from the client as they arrive, or from the spool.
    source: Literal["value", "stream", "spool"] = "value"


def _head(boundary: str, part: _Part) -> bytes:
    lines = [f"--{boundary}", *(f"{k}: {v}" for k, v in part.headers), "", ""]
    return "\r\n".join(lines).encode()


def _headers_of(part: aiohttp.BodyPartReader) -> list[tuple[str, str]]:
    keep = ("Content-Disposition", "Content-Type")
    return [(k, part.headers[k]) for k in keep if k in part.headers]


class _Counter:
    """Bytes read from the client, against the route's limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0

    def add(self, n: int) -> None:
        self.seen += n
        if self.seen > self.limit:
            raise bodies.too_large(self.limit)


async def _read_field(part: aiohttp.BodyPartReader, count: _Counter) -> bytes:
    value = bytearray()
    while chunk := await part.read_chunk(_CHUNK):
        count.add(len(chunk))
        value += chunk
        if len(value) > _FIELD_LIMIT:
            raise BadRequest(f"form field '{part.name}' is longer than {_FIELD_LIMIT} bytes")
    return bytes(value)


async def _spool(part: aiohttp.BodyPartReader, count: _Counter) -> IO[bytes]:
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the caller
    try:
        while chunk := await part.read_chunk(_CHUNK):
            count.add(len(chunk))
            await asyncio.to_thread(spool.write, chunk)
    except BaseException:
        spool.close()
        raise
    return spool


def handler(family: Family, capability: Capability | None, limit: int, check: Check) -> Handler:
    dialect = family_dialect(family)

    async def handle(request: web.Request) -> web.StreamResponse:
        request[ROUTE_DIALECT] = dialect
        if request.content_type != "multipart/form-data":
            raise BadRequest("this endpoint takes a multipart/form-data body")
        if request.content_length is not None and request.content_length > limit:
            raise bodies.too_large(limit)
        count = _Counter(limit)
        try:
            reader = await request.multipart()
        except ValueError as e:  # no boundary, a broken Content-Type
            raise BadRequest(f"malformed multipart body: {e}") from None
        before: list[_Part] = []
        try:
            model, file, spool = await _read_head(reader, before, count)
        except (ValueError, UnicodeError, AssertionError, HttpProcessingError) as e:
            # aiohttp's parser raises these for a body that breaks the format.
            raise BadRequest(f"malformed multipart body: {e}") from None
        try:
            if not model:
                raise BadRequest("the form field 'model' is required")
            scheduler = request.app[SCHEDULER]
            refuse_undeclared(family, request.path, check(scheduler, model, capability))
            boundary = "corral-" + secrets.token_hex(12)
            parts = _Body(boundary, before, file, spool, reader, count)
            spec = upstream.Call(
                model=model, path=request.path, data=parts.payload,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                replayable=file is None,
            )
            return await upstream.answer(request, family, spec, relay)
        finally:
            if spool is not None:
                spool.close()

    return handle


async def _read_head(
    reader: aiohttp.MultipartReader, before: list[_Part], count: _Counter
) -> tuple[str | None, aiohttp.BodyPartReader | None, IO[bytes] | None]:
    """Read parts until ``model`` and the file are both known (or the form ends):
    the model, the file to stream on (model came first) or the spool (it did not)."""
    model: str | None = None
    spool: IO[bytes] | None = None
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, aiohttp.BodyPartReader):
                raise BadRequest("nested multipart bodies are not supported")
            p = _Part(part.name or "", _headers_of(part))
            if part.filename is None:
                p.value = await _read_field(part, count)
                if p.name == "model":
                    model = p.value.decode("utf-8", "replace").strip()
                before.append(p)
                continue
            if spool is not None:
                raise BadRequest("only one file may be uploaded per call")
            if model:
                p.source = "stream"
                before.append(p)
                return model, part, None
            spool = await _spool(part, count)
            p.source = "spool"
            before.append(p)
    except BaseException:
        if spool is not None:
            spool.close()
        raise
    return model, None, spool


class _Body:
    """The form as sent upstream: the fields read so far, then the file (streamed
    from the client, or from the spool), then whatever the client sends after it."""

    def __init__(self, boundary: str, before: list[_Part], file: aiohttp.BodyPartReader | None,
                 spool: IO[bytes] | None, reader: aiohttp.MultipartReader,
                 count: _Counter) -> None:
        self._boundary = boundary
        self._before = before
        self._file = file
        self._spool = spool
        self._reader = reader
        self._count = count

    def payload(self, rename: str | None = None) -> Any:
        return aiohttp.AsyncIterablePayload(self._chunks(rename))

    async def _chunks(self, rename: str | None) -> AsyncIterator[bytes]:
        b = self._boundary
        for part in self._before:
            yield _head(b, part)
            if rename is not None and part.name == "model" and part.source == "value":
                # An upstream that names the model differently (a remote's `model`).
                yield rename.encode()
            elif part.source == "stream" and self._file is not None:
                while chunk := await self._file.read_chunk(_CHUNK):
                    self._count.add(len(chunk))
                    yield chunk
            elif part.source == "spool" and self._spool is not None:
                await asyncio.to_thread(self._spool.seek, 0)
                while chunk := await asyncio.to_thread(self._spool.read, _CHUNK):
                    yield chunk
            else:
                yield part.value
            yield b"\r\n"
        if self._file is not None:
            # Fields after the streamed file: read now, after it.
            while (later := await self._reader.next()) is not None:
                if isinstance(later, aiohttp.BodyPartReader):
                    p = _Part(later.name or "", _headers_of(later))
                    p.value = await _read_field(later, self._count)
                    yield _head(b, p) + p.value + b"\r\n"
        yield f"--{b}--\r\n".encode()

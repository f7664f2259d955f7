"""Multipart endpoints (audio transcriptions and translations, image edits and
variations): find ``model`` in the form, stream the files on.

The parts are read in order. Small fields are kept; when ``model`` has been seen
before the first file (the order the OpenAI SDKs send), the call is leased and the
file is streamed to the upstream as it arrives, followed by any later parts, files
(an image edit's mask, more images) streamed the same way: memory stays at a chunk or
two whatever the files' sizes. Files that come before ``model`` are first spooled to
temporary files (written from a worker thread), then sent from disk; such a call can
also be resent, a streamed one cannot.
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
from proxy.calls.call import Call, Client
from proxy.calls.streaming import relay
from proxy.dialects.families.bridge import refuse_undeclared
from proxy.edge import body as bodies
from proxy.edge.errors import ROUTE_DIALECT, Family, family_dialect
from proxy.keys import SCHEDULER
from scheduler.config.root import Capability, ModelConfig
from scheduler.errors import BadRequest, CorralError
from scheduler.scheduling.scheduler import Scheduler, Upstream

Check = Callable[[Scheduler, str, Capability | None], ModelConfig]
# The model a form that names none is for (None: it must name one).
Implied = Callable[[Scheduler, Capability | None, None], str | None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_FIELD_LIMIT = 64 << 10
_CHUNK = 256 << 10


@dataclass(slots=True)
class _Part:
    name: str
    headers: list[tuple[str, str]]
    value: bytes = b""
    # A file: its bytes come from the client as they arrive, or from its spool.
    source: Literal["value", "stream", "spool"] = "value"
    spool: IO[bytes] | None = None


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


def handler(family: Family, capability: Capability | None, limit: int, check: Check,
            implied: Implied | None = None) -> Handler:
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
            model, file = await _read_head(reader, before, count)
        except (ValueError, UnicodeError, AssertionError, HttpProcessingError) as e:
            _close(before)
            # aiohttp's parser raises these for a body that breaks the format.
            raise BadRequest(f"malformed multipart body: {e}") from None
        except BaseException:
            _close(before)
            raise
        try:
            scheduler = request.app[SCHEDULER]
            if not model and implied is not None:
                model = implied(scheduler, capability, None)
            if not model:
                raise BadRequest("the form field 'model' is required")
            refuse_undeclared(family, request.path, check(scheduler, model, capability))
            boundary = "corral-" + secrets.token_hex(12)
            parts = _Body(boundary, before, file, reader, count)
            spec = Call(
                model=model, path=request.path, data=parts.payload,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                replayable=file is None,
            )

            async def consume(up: Upstream, resp: aiohttp.ClientResponse,
                              client: Client) -> web.StreamResponse:
                if parts.error is not None:
                    # The client's form broke while it streamed on: its error (a 400,
                    # a 413), not the upstream's answer to the cut-short form.
                    raise parts.error
                return await relay(up, resp, client)

            return await upstream.answer(request, family, spec, consume)
        finally:
            _close(before)

    return handle


# Files a form may carry (an image edit sends up to 16 images and a mask).
_MAX_FILES = 32


def _close(parts: list[_Part]) -> None:
    for p in parts:
        if p.spool is not None:
            p.spool.close()


async def _read_head(
    reader: aiohttp.MultipartReader, before: list[_Part], count: _Counter
) -> tuple[str | None, aiohttp.BodyPartReader | None]:
    """Read parts into ``before`` until ``model`` and a file are both known (or the form
    ends): the model, and the file to stream on (model came before it). Files read
    before ``model`` are spooled; the caller closes their spools."""
    model: str | None = None
    files = 0
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
        files += 1
        if files > _MAX_FILES:
            raise BadRequest(f"at most {_MAX_FILES} files may be uploaded per call")
        if model:
            p.source = "stream"
            before.append(p)
            return model, part
        p.source = "spool"
        before.append(p)
        p.spool = await _spool(part, count)
    return model, None


class _Body:
    """The form as sent upstream: the fields read so far, then the file (streamed
    from the client, or from the spool), then whatever the client sends after it."""

    def __init__(self, boundary: str, before: list[_Part], file: aiohttp.BodyPartReader | None,
                 reader: aiohttp.MultipartReader, count: _Counter) -> None:
        self._boundary = boundary
        self._before = before
        self._file = file
        self._reader = reader
        self._count = count
        # What was wrong with the client's form, found while streaming it on.
        self.error: CorralError | None = None

    def payload(self, rename: str | None = None) -> Any:
        return aiohttp.AsyncIterablePayload(self._guarded(rename))

    async def _guarded(self, rename: str | None) -> AsyncIterator[bytes]:
        """The form; one that breaks midway (too large, too many files, malformed) is
        ended cleanly and its error kept for the consumer. Raised here, it would reach
        the call path as a failed send: a 502, and the upstream reported as failing."""
        try:
            async for chunk in self._chunks(rename):
                yield chunk
        except CorralError as e:
            self.error = e
        except (ValueError, UnicodeError, AssertionError, HttpProcessingError) as e:
            self.error = BadRequest(f"malformed multipart body: {e}")
        else:
            return
        yield f"\r\n--{self._boundary}--\r\n".encode()

    async def _chunks(self, rename: str | None) -> AsyncIterator[bytes]:
        b = self._boundary
        for part in self._before:
            yield _head(b, part)
            if rename is not None and part.name == "model" and part.source == "value":
                # An upstream that names the model differently (a remote's `model`).
                yield rename.encode()
            elif part.source == "stream" and self._file is not None:
                async for chunk in self._streamed(self._file):
                    yield chunk
            elif part.spool is not None:
                await asyncio.to_thread(part.spool.seek, 0)
                while chunk := await asyncio.to_thread(part.spool.read, _CHUNK):
                    yield chunk
            else:
                yield part.value
            yield b"\r\n"
        if self._file is not None:
            # Parts after the streamed file: fields read now, files streamed on.
            files = sum(p.source != "value" for p in self._before)
            while (later := await self._reader.next()) is not None:
                if not isinstance(later, aiohttp.BodyPartReader):
                    raise BadRequest("nested multipart bodies are not supported")
                p = _Part(later.name or "", _headers_of(later))
                if later.filename is None:
                    p.value = await _read_field(later, self._count)
                    yield _head(b, p) + p.value + b"\r\n"
                    continue
                files += 1
                if files > _MAX_FILES:
                    raise BadRequest(f"at most {_MAX_FILES} files may be uploaded per call")
                yield _head(b, p)
                async for chunk in self._streamed(later):
                    yield chunk
                yield b"\r\n"
        yield f"--{b}--\r\n".encode()

    async def _streamed(self, part: aiohttp.BodyPartReader) -> AsyncIterator[bytes]:
        while chunk := await part.read_chunk(_CHUNK):
            self._count.add(len(chunk))
            yield chunk

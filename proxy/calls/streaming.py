"""The one relay, SSE reader, SSE writer and NDJSON writer.

The OpenAI path relays upstream bytes as they arrive (contract 9). A small
non-streaming answer with a known length is read whole and sent in one write,
which costs nothing in latency and saves a chunked-encoding round per call; a
stream, or a body of unknown or large size, is relayed chunk by chunk.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, NamedTuple

import aiohttp
import msgspec
from aiohttp import web

from proxy.calls.call import Client
from proxy.dialects.translate import upstream_error_body
from proxy.edge import reqlog
from proxy.edge.errors import (
    Family,
    family_dialect,
    public_message,
    render,
    stream_error_event,
)
from proxy.keys import SCHEDULER
from proxy.metrics.registry import MODEL_HEADER
from scheduler.errors import CorralError, UpstreamFailed, UpstreamStalled
from scheduler.scheduling.scheduler import Upstream

log = logging.getLogger(__name__)

# Bodies up to this size with a Content-Length are read whole before answering.
_WHOLE_BODY_LIMIT = 1 << 20

_UPSTREAM_BROKE = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)


def stream_response(status: int = 200,
                    headers: dict[str, str] | None = None) -> web.StreamResponse:
    """A streamed answer whose status line and headers go out with its first bytes.

    aiohttp's StreamResponse writes its head alone at ``prepare()``: one more send (a
    syscall, and on loopback the receiver's TCP work on the sender's CPU) and one more
    segment per streamed answer. Every caller here writes as soon as it has prepared
    (and ``write_eof()`` sends a head still held), so nothing waits for it."""
    out = web.StreamResponse(status=status, headers=headers)
    out._send_headers_immediately = False
    return out


def is_event_stream(resp: aiohttp.ClientResponse) -> bool:
    return resp.content_type == "text/event-stream"


async def relay(up: Upstream, resp: aiohttp.ClientResponse, client: Client) -> web.StreamResponse:
    """Send an upstream response to the client as it comes (a ``upstream.call``
    consumer).

    Nothing is sent before the answer's first byte has arrived, so an upstream that
    fails before it can be replaced. ``X-Corral-Model`` names the model that
    answered, which differs from the one asked for when a fallback served the call.
    """
    if client.response is not None:
        # Loading feedback has sent the headers: the answer joins that stream.
        return await _relay_into(client.response, up, resp, client)
    length = resp.content_length
    sse = is_event_stream(resp)
    if resp.status >= 400:
        raw = await resp.read()
        client.answered = True
        return error_answer(up, resp, raw, client.family)
    if not sse and length is not None and length <= _WHOLE_BODY_LIMIT:
        body = await resp.read()
        client.answered = True
        return web.Response(
            status=resp.status,
            body=body,
            headers={
                "Content-Type": resp.headers.get("Content-Type", "application/json"),
                MODEL_HEADER: up.model,
            },
        )
    first = await resp.content.readany()
    out = stream_response(resp.status, {MODEL_HEADER: up.model})
    out.content_type = resp.content_type
    if resp.charset:
        out.charset = resp.charset
    if sse:
        out.headers["Cache-Control"] = "no-cache"
        # Tell nginx & co. in front of us not to buffer the stream either.
        out.headers["X-Accel-Buffering"] = "no"
    elif length is not None:
        out.content_length = length
    client.answered = True
    assert client.request is not None, "relay answers an HTTP request"
    await out.prepare(client.request)
    await _pump(out, up, resp, client, sse, first)
    return out


def error_answer(up: Upstream, resp: aiohttp.ClientResponse, raw: bytes,
                 family: Family) -> web.Response:
    """An upstream's error answer for a relaying route: a JSON one as it came; anything
    else (llama-server's text/plain 500, an HTML page from a proxy,
    sd-server's ``{"error": "..."}``) wrapped in the caller's envelope with the
    upstream's status, as is every error for an Anthropic client (llama-server answers
    in OpenAI's envelope, of which it would read nothing).
    """
    if family != "anthropic" and _relayable(resp, raw):
        return web.Response(status=resp.status, body=raw, headers={
            "Content-Type": resp.headers.get("Content-Type", "application/json"),
            MODEL_HEADER: up.model})
    answer = render(upstream_error_body(resp.status, raw), family_dialect(family))
    answer.headers[MODEL_HEADER] = up.model
    return answer


def _relayable(resp: aiohttp.ClientResponse, raw: bytes) -> bool:
    if resp.content_type != "application/json" and not resp.content_type.endswith("+json"):
        return False
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return False
    # An "error" that is a bare string (sd-server's {"error": "prompt required"}) is
    # wrapped like a text error: an OpenAI client reads error.message. Any other JSON
    # (OpenAI's envelope, vLLM's {"object": "error", ...}) goes as it came.
    return not (isinstance(body, dict) and isinstance(body.get("error"), str))


async def _relay_into(
    out: web.StreamResponse, up: Upstream, resp: aiohttp.ClientResponse, client: Client
) -> web.StreamResponse:
    if resp.status != 200:
        err = upstream_error_body(resp.status, await resp.read())
        client.answered = True
        await out.write_eof(stream_error_event(err, client.family))
        return out
    first = await resp.content.readany()
    client.answered = True
    info = reqlog.current()
    if info is not None:
        # Time to first token is the answer's, not the loading feedback's.
        info.first_byte = time.perf_counter()
    await _pump(out, up, resp, client, True, first)
    return out


async def _pump(
    out: web.StreamResponse, up: Upstream, resp: aiohttp.ClientResponse, client: Client,
    sse: bool, chunk: bytes,
) -> None:
    """Relay ``chunk`` (the first read) and the rest of the answer as it comes."""
    content = resp.content
    try:
        while chunk:
            if content.at_eof():
                # The upstream's last read (or the whole answer, read at once): its
                # bytes go out with the end, in one send.
                reqlog.mark_ended()
                await out.write_eof(chunk)
                return
            if sse and _ends(chunk):
                reqlog.mark_ended()
            await out.write(chunk)
            chunk = await content.readany()
    except ConnectionResetError:
        raise  # a write to a client that went away (aiohttp's is also a ClientError)
    except _UPSTREAM_BROKE as e:
        log.warning("instance %s broke mid-stream: %s", up.instance_id, e or type(e).__name__)
        if isinstance(e, TimeoutError) and client.request is not None:
            await client.request.app[SCHEDULER].suspect(up.instance_id, "stalled mid-stream")
        if sse:
            err = UpstreamFailed(f"upstream instance {up.instance_id} failed mid-stream: "
                                 f"{'timed out' if isinstance(e, TimeoutError) else e}")
            await out.write(stream_error_event(err, client.family))
        return
    reqlog.mark_ended()
    await out.write_eof()


# How the last event of a stream passed through ends: OpenAI's chat and completions
# (also llama-server's), Anthropic Messages. Checked on the tail of each read.
_LAST_EVENTS = (b"data: [DONE]\n\n", b'"type":"message_stop"}\n\n')
# How the Responses API's last event begins: it has no [DONE], and its data (the whole
# response, llama-server's timings) ends in no fixed way. Codex hangs up on reading it.
_RESPONSES_LAST = (b"event: response.completed\n", b"event: response.incomplete\n",
                   b"event: response.failed\n")


def _ends(chunk: bytes) -> bool:
    """Whether a read ends with a stream's last event. A Responses end event split
    over two reads is missed (the call then counts 499 if the client leaves early)."""
    if chunk.endswith(_LAST_EVENTS):
        return True
    if not chunk.endswith(b"\n\n"):
        return False
    start = chunk.rfind(b"\n\n", 0, len(chunk) - 2)
    return chunk.startswith(_RESPONSES_LAST, start + 2 if start >= 0 else 0)


def stream_error(message: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "upstream_error",
            "code": "upstream_failed",
            "src": "corral",
        }
    }


# The translating paths parse every upstream event and write every line: with the
# standard json module that was 52 % of the Ollama path's CPU. msgspec (proxy/edge/jsonc.py
# chose it; orjson measured within a few percent) parses and writes several times
# faster, and writes UTF-8 as it is (no \u escapes; every client reads UTF-8 JSON).
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def sse_event(payload: dict[str, Any] | str) -> bytes:
    if isinstance(payload, str):
        return b"data: " + payload.encode() + b"\n\n"
    return b"data: " + _encode(payload) + b"\n\n"


def ndjson_line(payload: dict[str, Any]) -> bytes:
    return _encode(payload) + b"\n"


# What one SSE line means: an event, the end of the stream, or nothing.
_DONE: dict[str, Any] = {}


def _sse_line(raw: bytes) -> dict[str, Any] | None:
    line = raw.strip()
    if not line or line.startswith(b":"):
        return None
    if line.startswith(b"data:"):
        data = line[5:].strip()
        if data == b"[DONE]":
            return _DONE
    elif line.startswith(b"error:"):
        data = line[6:].strip()
        try:
            obj = _decode(data)
        except msgspec.DecodeError:
            obj = {"message": data.decode("utf-8", "replace")}
        return {"error": obj}
    else:
        return None
    return sse_json(data)


def sse_json(data: bytes) -> dict[str, Any] | None:
    """One event's data parsed; None, logged, for one that is no JSON object."""
    try:
        event = _decode(data)
    except (msgspec.DecodeError, RecursionError):
        log.warning("unparseable SSE data from upstream: %.200r", data)
        return None
    return event if isinstance(event, dict) else None


def _failed(e: BaseException, instance_id: str) -> UpstreamFailed:
    """A broken upstream read as UpstreamFailed (UpstreamStalled for silence)."""
    kind = UpstreamStalled if isinstance(e, TimeoutError) else UpstreamFailed
    return kind(f"upstream instance {instance_id} failed mid-stream: {e or type(e).__name__}")


async def sse_event_batches(
    resp: aiohttp.ClientResponse, instance_id: str | None = None,
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Parse llama-server's SSE stream into JSON objects, a batch per network read.

    Skips blank lines and ':' comments (pings), stops at ``[DONE]``, and turns both
    error shapes (``data: {"error": ...}`` and the older bare ``error: {...}`` line)
    into ``{"error": {...}}`` objects for the caller to render; nothing follows one.
    A batch holds the events that arrived together, so a translating writer can
    answer them with one write: no event waits for a later one. With ``instance_id``, a
    broken upstream connection is raised as UpstreamFailed (UpstreamStalled for
    silence): here, not by a generator around this one (a frame less a batch).
    """
    rest = b""
    read = resp.content.readany
    while True:
        try:
            chunk = await read()
        except _UPSTREAM_BROKE as e:
            if instance_id is None:
                raise
            raise _failed(e, instance_id) from None
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        batch: list[dict[str, Any]] = []
        for line in lines:
            if line.startswith(b"data: {") and line.endswith(b"}"):
                # The common line, inline: one event's JSON object.
                try:
                    event = _decode(line[6:])
                except (msgspec.DecodeError, RecursionError):
                    event = _sse_line(line)  # logged there
            else:
                event = _sse_line(line)
            if event is _DONE:
                if batch:
                    yield batch
                return
            if event is not None:
                batch.append(event)
                if "error" in event:
                    yield batch
                    return
        if batch:
            yield batch
    event = _sse_line(rest)  # a last line without its newline
    if event is not None and event is not _DONE:
        yield [event]


_DONE_DATA = b"[DONE]"


def _sse_data(raw: bytes) -> bytes | None:
    """The JSON text of one SSE line (``[DONE]`` as it is), or None for nothing; the
    old bare ``error: {...}`` line comes back as ``{"error": ...}``."""
    line = raw.strip()
    if line.startswith(b"data:"):
        return line[5:].strip()
    if line.startswith(b"error:"):
        event = _sse_line(line)
        return _encode(event) if event is not None else None
    return None


async def sse_data_batches(
    resp: aiohttp.ClientResponse, instance_id: str | None = None,
) -> AsyncGenerator[list[bytes], None]:
    """``sse_event_batches`` without the parsing: each event's JSON text, a batch per
    network read, for a consumer with a faster decoder of its own (the Ollama lines).
    Stops at ``[DONE]``; the consumer finds errors in what it decodes."""
    rest = b""
    read = resp.content.readany
    while True:
        try:
            chunk = await read()
        except _UPSTREAM_BROKE as e:
            if instance_id is None:
                raise
            raise _failed(e, instance_id) from None
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        batch: list[bytes] = []
        for line in lines:
            # Inline for the common line: this loop runs once per event.
            if line.startswith(b"data: ") and line.endswith(b"}"):
                batch.append(line[6:])
                continue
            if not line:
                continue  # the blank line after every event
            data = _sse_data(line)
            if data is None:
                continue
            if data == _DONE_DATA:
                if batch:
                    yield batch
                return
            batch.append(data)
        if batch:
            yield batch
    data = _sse_data(rest)
    if data is not None and data != _DONE_DATA:
        yield [data]


def upstream_data_batches(
    resp: aiohttp.ClientResponse, instance_id: str
) -> AsyncGenerator[list[bytes], None]:
    """``sse_data_batches``, with a broken upstream connection raised as UpstreamFailed."""
    return sse_data_batches(resp, instance_id)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """``sse_event_batches`` one event at a time."""
    async for batch in sse_event_batches(resp):
        for event in batch:
            yield event


def upstream_batches(
    resp: aiohttp.ClientResponse, instance_id: str
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """``sse_event_batches``, with a broken upstream connection raised as UpstreamFailed."""
    return sse_event_batches(resp, instance_id)


NDJSON = "application/x-ndjson"


class Last(NamedTuple):
    """A translated stream's closing batch, yielded last: ``write_stream`` sends it with
    the stream's end, in one send."""

    batch: list[dict[str, Any]] | bytes


async def write_stream(
    request: web.Request,
    batches: AsyncGenerator[list[dict[str, Any]] | bytes | Last, None],
    *,
    ndjson: bool,
    client: Client | None = None,
) -> web.StreamResponse:
    """Send translated items as NDJSON lines (Ollama) or SSE events (LM Studio).

    Each batch goes out in one write; a batch may come already encoded (bytes), and
    one marked ``Last`` goes out with the stream's end. The
    response is prepared at the first item, so a CorralError raised before it still
    reaches the error middleware and gets its real status. One raised later becomes the
    last item, ``{"error": ...}`` (Ollama) or an OpenAI-shaped error event (LM Studio),
    because the status line is already sent (and ``client``, given, is marked answered
    then: from that point on a failure can no longer be resent). ``batches`` is closed
    on every path, so whatever upstream response it reads is released, also when the
    client goes away.
    """
    out: web.StreamResponse | None = None
    encode = ndjson_line if ndjson else sse_event

    async def start() -> web.StreamResponse:
        if client is not None:
            client.answered = True
        resp = stream_response()
        if ndjson:
            resp.content_type = NDJSON
        else:
            resp.content_type = "text/event-stream"
            resp.headers["Cache-Control"] = "no-cache"
            resp.headers["X-Accel-Buffering"] = "no"
        await resp.prepare(request)
        return resp

    failed = False
    tail = b""  # the Last batch, held for the end
    async with contextlib.aclosing(batches):
        try:
            async for item in batches:
                last = isinstance(item, Last)
                batch = item.batch if isinstance(item, Last) else item
                if not batch:
                    continue
                if out is None:
                    out = await start()
                data = batch if isinstance(batch, bytes) else b"".join(map(encode, batch))
                if last:
                    tail = data
                else:
                    await out.write(data)
        except CorralError as e:
            if out is None:
                raise
            log.warning("%s %s failed mid-stream: %s", request.method, request.path, e.message)
            shown = public_message(e)
            tail += encode({"error": shown} if ndjson else stream_error(shown))
            failed = True
    if out is None:
        out = await start()
    # The last item (Ollama's done line) is all there is left and nothing waits now.
    reqlog.mark_ended()
    await out.write_eof(tail + sse_event("[DONE]") if not ndjson and not failed else tail)
    return out

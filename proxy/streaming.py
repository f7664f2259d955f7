"""The one relay, SSE reader, SSE writer and NDJSON writer.

The OpenAI path relays upstream bytes as they arrive (contract 9). A small
non-streaming answer with a known length is read whole and sent in one write,
which costs nothing in latency and saves a chunked-encoding round per call; a
stream, or a body of unknown or large size, is relayed chunk by chunk.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from scheduler.errors import UpstreamFailed

log = logging.getLogger(__name__)

# Bodies up to this size with a Content-Length are read whole before answering.
_WHOLE_BODY_LIMIT = 1 << 20

_UPSTREAM_BROKE = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)


def is_event_stream(resp: aiohttp.ClientResponse) -> bool:
    return resp.content_type == "text/event-stream"


async def relay(
    request: web.Request, resp: aiohttp.ClientResponse, instance_id: str
) -> web.StreamResponse:
    """Send an upstream response to the client as it comes."""
    length = resp.content_length
    if not is_event_stream(resp) and length is not None and length <= _WHOLE_BODY_LIMIT:
        try:
            body = await resp.read()
        except _UPSTREAM_BROKE as e:
            raise UpstreamFailed(f"instance {instance_id} failed while answering: {e}") from None
        return web.Response(
            status=resp.status,
            body=body,
            headers={"Content-Type": resp.headers.get("Content-Type", "application/json")},
        )

    out = web.StreamResponse(status=resp.status)
    out.content_type = resp.content_type
    if resp.charset:
        out.charset = resp.charset
    if is_event_stream(resp):
        out.headers["Cache-Control"] = "no-cache"
        # Tell nginx & co. in front of us not to buffer the stream either.
        out.headers["X-Accel-Buffering"] = "no"
    elif length is not None:
        out.content_length = length
    await out.prepare(request)
    try:
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
    except _UPSTREAM_BROKE as e:
        log.warning("instance %s broke mid-stream: %s", instance_id, e)
        if is_event_stream(resp):
            await out.write(sse_event(stream_error(f"upstream instance {instance_id} failed "
                                                   f"mid-stream: {e or type(e).__name__}")))
        return out
    await out.write_eof()
    return out


def stream_error(message: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "upstream_error",
            "code": "upstream_failed",
            "src": "corral",
        }
    }


def sse_event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return b"data: " + data.encode() + b"\n\n"


def ndjson_line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n"


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Parse llama-server's SSE stream into JSON objects.

    Skips blank lines and ':' comments (pings), stops at ``[DONE]``, and turns both
    error shapes (``data: {"error": ...}`` and the older bare ``error: {...}`` line)
    into ``{"error": {...}}`` objects for the caller to render.
    """
    async for raw in resp.content:
        line = raw.strip()
        if not line or line.startswith(b":"):
            continue
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data == b"[DONE]":
                return
        elif line.startswith(b"error:"):
            data = line[6:].strip()
            try:
                obj = json.loads(data)
            except ValueError:
                obj = {"message": data.decode("utf-8", "replace")}
            yield {"error": obj}
            return
        else:
            continue
        try:
            event = json.loads(data)
        except ValueError:
            log.warning("unparseable SSE data from upstream: %.200r", data)
            continue
        if isinstance(event, dict):
            yield event

"""The tool loop for OpenAI chat completions, a Corral extension (docs/tools.md).

A chat body names servers in ``mcp_servers``: ``["name", ...]`` or
``[{"name": ..., "allowed_tools": [...]}]``. Chat has no MCP items of its own, so the
answer carries them beside its choices, in the Responses shapes: a whole answer gains
``mcp_list_tools`` and ``mcp_calls`` lists (and ``mcp_stopped``, the bound that ended
the loop, if one did); a stream sends each as it happens in a chunk with no choices and
an ``mcp`` object (an OpenAI client ignores it), then the answer, then ``[DONE]``.
Chat has no approval step: a server configured ``require_approval = "always"`` is
refused here.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from proxy.dialects.families.chat import new_id
from proxy.edge import jsonc
from proxy.edge.errors import stream_error_event
from proxy.keys import MCP_SERVERS, SCHEDULER
from proxy.metrics.registry import MODEL_HEADER
from proxy.tools import loop
from proxy.tools.calls import McpCall
from proxy.tools.client import Tool
from proxy.tools.items import Out, as_chunk, call_item, list_tools_item, names
from proxy.tools.servers import Servers
from scheduler.errors import BadRequest, CorralError

FIELD = "mcp_servers"


def uses(body: dict[str, Any], servers: Servers, field: str = FIELD) -> list[loop.Use]:
    given = body.get(field)
    if given is None:
        return []
    if not isinstance(given, list):
        raise BadRequest(f"'{field}' must be a list of configured MCP server names")
    out = []
    for i, entry in enumerate(given):
        if isinstance(entry, str):
            name, allowed = entry, None
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            if entry.get("url") is not None:
                raise BadRequest(f"{field}[{i}].url: Corral calls only the MCP servers of "
                                 "its config, by name")
            name = entry["name"]
            allowed = names(entry.get("allowed_tools"), f"{field}[{i}].allowed_tools")
        else:
            raise BadRequest(f"{field}[{i}] must be a server name or {{\"name\": ...}}")
        cfg = servers.configured(name)
        if cfg is not None and cfg.require_approval == "always":
            raise BadRequest(f"MCP server {name!r} needs approval for each call, which "
                             f"this API has no step for (use the Responses API)")
        out.append(loop.Use(name, allowed))
    return out


class _Sink:
    """Items kept for a whole answer, or sent as chunks as they happen."""

    def __init__(self, request: web.Request, model: str, stream: bool) -> None:
        self.stream = stream
        self.out = Out(request, model)
        self.model = model
        self.id = new_id("chatcmpl-")
        self.listed_items: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []

    def _chunk(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model, "choices": [], "mcp": item}

    async def listed(self, server: str, tools: list[Tool], error: str | None) -> None:
        item = list_tools_item(server, tools, error)
        self.listed_items.append(item)
        if self.stream:
            await self.out.write([(None, self._chunk(item))])

    async def text(self, delta: dict[str, Any]) -> None:
        chunk = {**self._chunk({}), "choices": [
            {"index": 0, "delta": {"role": "assistant", **delta}, "finish_reason": None}]}
        del chunk["mcp"]
        await self.out.write([(None, chunk)])

    async def calling(self, call: McpCall) -> None:
        if self.stream:
            await self.out.write([(None, self._chunk(call_item(call, done=False)))])

    async def called(self, call: McpCall) -> None:
        item = call_item(call, done=True)
        self.calls.append(item)
        if self.stream:
            await self.out.write([(None, self._chunk(item))])


async def answer(request: web.Request, model: str, body: dict[str, Any],
                 used: list[loop.Use], field: str = FIELD) -> web.StreamResponse:
    app = request.app
    chat = {k: v for k, v in body.items() if k != field}
    stream = body.get("stream") is True
    sink = _Sink(request, model, stream)
    try:
        outcome = await loop.run(app, app[MCP_SERVERS], app[SCHEDULER].config.mcp, model,
                                 chat, used,
                                 sink)
    except CorralError as e:
        if sink.out.response is None:
            raise
        await sink.out.response.write(stream_error_event(e, "openai"))
        await sink.out.response.write_eof()
        return sink.out.response
    final = outcome.answer
    if not stream:
        out = {**final, "mcp_list_tools": sink.listed_items, "mcp_calls": sink.calls}
        if outcome.stopped:
            out["mcp_stopped"] = outcome.stopped
        return web.Response(body=jsonc.dumps(out), content_type="application/json",
                            headers={MODEL_HEADER: model})
    chunk = {**as_chunk(final, text=False), "id": sink.id}  # the text came as it was made
    if outcome.stopped:
        chunk["mcp_stopped"] = outcome.stopped
    await sink.out.write([(None, chunk)])
    assert sink.out.response is not None
    await sink.out.response.write(b"data: [DONE]\n\n")
    await sink.out.response.write_eof()
    return sink.out.response

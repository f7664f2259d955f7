"""The tool loop for Ollama's ``/api/chat``, a Corral extension (docs/tools.md).

The body names servers in ``mcp_servers`` as the chat extension does
(proxy/tools/chat.py). Ollama has no MCP lines of its own: while streaming, each
listing and call is a line with an ``mcp`` object (the Responses item) and an empty
assistant message, sent as it happens, and the answer's lines follow; a whole answer
gains ``mcp_list_tools`` and ``mcp_calls`` lists. The lines are Ollama's own
(proxy/dialects/stream_translate.py), so the ``ollama`` client reads them.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from proxy.calls.streaming import ndjson_line
from proxy.dialects import ollama_request
from proxy.dialects.stream_translate import OllamaStream
from proxy.dialects.translate import rfc3339
from proxy.keys import MCP_SERVERS, SCHEDULER
from proxy.tools import chat, loop
from proxy.tools.calls import McpCall
from proxy.tools.client import Tool
from proxy.tools.items import as_chunk, call_item, list_tools_item
from scheduler.errors import CorralError

FIELD = chat.FIELD


class _Sink:
    def __init__(self, request: web.Request, display: str, stream: bool,
                 think: bool) -> None:
        self.request = request
        self.think = think
        self.display = display
        self.stream = stream
        self.response: web.StreamResponse | None = None
        self.listed_items: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []

    async def write(self, line: dict[str, Any]) -> None:
        if self.response is None:
            out = web.StreamResponse()
            out.content_type = "application/x-ndjson"
            await out.prepare(self.request)
            self.response = out
        await self.response.write(ndjson_line(line))

    async def _item(self, item: dict[str, Any]) -> None:
        if self.stream:
            await self.write({"model": self.display, "created_at": rfc3339(),
                              "message": {"role": "assistant", "content": ""},
                              "done": False, "mcp": item})

    async def listed(self, server: str, tools: list[Tool], error: str | None) -> None:
        item = list_tools_item(server, tools, error)
        self.listed_items.append(item)
        await self._item(item)

    async def text(self, delta: dict[str, Any]) -> None:
        message = {"role": "assistant", "content": delta.get("content", "")}
        if self.think and delta.get("reasoning_content"):
            message["thinking"] = delta["reasoning_content"]
        if message["content"] or "thinking" in message:
            await self.write({"model": self.display, "created_at": rfc3339(),
                              "message": message, "done": False})

    async def calling(self, call: McpCall) -> None:
        await self._item(call_item(call, done=False))

    async def called(self, call: McpCall) -> None:
        item = call_item(call, done=True)
        self.calls.append(item)
        await self._item(item)


async def maybe(request: web.Request, body: dict[str, Any], model: str, display: str,
                stream: bool, think: bool) -> web.StreamResponse | None:
    """The answer of an ``/api/chat`` call that names MCP servers; None otherwise."""
    servers = request.app.get(MCP_SERVERS)
    if servers is None or FIELD not in body:
        return None
    used = chat.uses(body, servers)
    if not used:
        return None
    loop.check_uses(request.app, servers, model, [u.server for u in used])
    started = time.monotonic_ns()
    payload = ollama_request.chat_body({k: v for k, v in body.items() if k != FIELD}, model)
    if body.get("tool_choice") in ("auto", "none", "required"):
        # An extension beside mcp_servers: Ollama has no tool_choice of its own.
        payload["tool_choice"] = body["tool_choice"]
    sink = _Sink(request, display, stream, think)
    try:
        outcome = await loop.run(request.app, servers, request.app[SCHEDULER].config.mcp,
                                 model, payload, used, sink)
    except CorralError as e:
        if sink.response is None:
            raise
        await sink.write({"error": e.message})
        await sink.response.write_eof()
        return sink.response
    state = OllamaStream("chat", display, show_thinking=think)
    state.feed(as_chunk(outcome.answer))
    total = time.monotonic_ns() - started
    if not stream:
        whole = {**state.whole(total, 0), "mcp_list_tools": sink.listed_items,
                 "mcp_calls": sink.calls}
        if outcome.stopped:
            whole["mcp_stopped"] = outcome.stopped
        return web.json_response(whole)
    # The answer's text came as it was generated (Sink.text).
    for line in state.tail(total, 0):
        await sink.write(line)
    assert sink.response is not None
    await sink.response.write_eof()
    return sink.response

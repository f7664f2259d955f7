"""The tool loop for Anthropic Messages: the MCP connector's ``mcp_servers``, by name.

``mcp_servers: [{"type": "url", "name": NAME, "tool_configuration": {"allowed_tools":
[...]}}]`` (the connector's shape, sent with ``anthropic-beta: mcp-client-...``; the
header is not required) or a ``{"type": "mcp_toolset", "mcp_server_name": NAME}`` tool
names a configured server; a ``url`` is refused unless it is that server's configured
URL, and ``authorization_token`` is never used (the config holds the credentials).
Each call shows as an ``mcp_tool_use`` block and its ``mcp_tool_result``, streamed as
``content_block_start``/``stop`` as they happen, then the model's answer as the
translated family gives it (proxy/dialects/families/anthropic_chat.py). Blocks of
Corral's own a client sends back in later turns are dropped before translation.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.dialects.families import Event, anthropic_chat
from proxy.edge import jsonc
from proxy.edge.errors import stream_error_event
from proxy.keys import MCP_SERVERS, SCHEDULER
from proxy.metrics.registry import MODEL_HEADER
from proxy.tools import loop
from proxy.tools.calls import McpCall
from proxy.tools.client import Tool
from proxy.tools.items import Out, as_chunk, names, no_url
from proxy.tools.servers import Servers
from scheduler.errors import BadRequest, CorralError

_OURS = ("mcp_tool_use", "mcp_tool_result")


def uses(body: dict[str, Any], servers: Servers) -> list[loop.Use]:
    out: list[loop.Use] = []
    given = body.get("mcp_servers")
    if given is not None and not isinstance(given, list):
        raise BadRequest("'mcp_servers' must be a list")
    for i, s in enumerate(given or []):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            raise BadRequest(f"mcp_servers[{i}] needs a 'name': a configured MCP server")
        no_url(servers, s["name"], s.get("url"), f"mcp_servers[{i}].url")
        conf = s.get("tool_configuration") or {}
        if not isinstance(conf, dict):
            raise BadRequest(f"mcp_servers[{i}].tool_configuration must be an object")
        if conf.get("enabled") is False:
            continue
        out.append(loop.Use(s["name"], names(
            conf.get("allowed_tools"), f"mcp_servers[{i}].tool_configuration.allowed_tools")))
    tools = body.get("tools")
    for i, t in enumerate(tools if isinstance(tools, list) else []):
        if isinstance(t, dict) and t.get("type") == "mcp_toolset":
            name = t.get("mcp_server_name")
            if not isinstance(name, str):
                raise BadRequest(f"tools[{i}].mcp_server_name must name a configured server")
            if all(u.server != name for u in out):
                out.append(loop.Use(name))
    for u in out:
        cfg = servers.configured(u.server)
        if cfg is not None and cfg.require_approval == "always":
            raise BadRequest(f"MCP server {u.server!r} needs approval for each call, which "
                             "Anthropic Messages has no step for (use the Responses API)")
    return out


def _without_ours(body: dict[str, Any]) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body
    kept = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            content = [b for b in content
                       if not (isinstance(b, dict) and b.get("type") in _OURS)]
            if not content:
                continue
            m = {**m, "content": content}
        kept.append(m)
    out = {**{k: v for k, v in body.items() if k != "mcp_servers"}, "messages": kept}
    tools = body.get("tools")
    if isinstance(tools, list):
        out["tools"] = [t for t in tools
                        if not (isinstance(t, dict) and t.get("type") == "mcp_toolset")]
    return out


class _Sink:
    def __init__(self, request: web.Request, ask: anthropic_chat.Asked, model: str) -> None:
        self.stream = ask.stream
        self.machine = anthropic_chat.Stream(ask)
        self.out = Out(request, model)
        self.blocks: list[dict[str, Any]] = []

    async def begin(self) -> None:
        if self.stream:
            await self.out.write(self.machine.start({"model": self.machine.ask.model}))

    async def text(self, delta: dict[str, Any]) -> None:
        await self.out.write(self.machine.feed({"choices": [{"index": 0, "delta": delta}]}))

    async def _block(self, block: dict[str, Any]) -> None:
        self.blocks.append(block)
        if self.stream:
            # Numbered in the machine's sequence, after a streamed text block it closes.
            events: list[Event] = self.machine._close()
            self.machine._block += 1
            index = self.machine._block
            events += [
                ("content_block_start", {"type": "content_block_start", "index": index,
                                         "content_block": block}),
                ("content_block_stop", {"type": "content_block_stop", "index": index})]
            await self.out.write(events)

    async def listed(self, server: str, tools: list[Tool], error: str | None) -> None:
        pass  # Messages has no block for a listing; a failed start shows in each call

    async def calling(self, call: McpCall) -> None:
        await self._block({"type": "mcp_tool_use", "id": "mcptoolu_" + call.id,
                           "name": call.name, "server_name": call.server,
                           "input": call.args()})

    async def called(self, call: McpCall) -> None:
        text = call.output if call.error is None else call.error
        await self._block({"type": "mcp_tool_result", "tool_use_id": "mcptoolu_" + call.id,
                           "is_error": call.error is not None,
                           "content": [{"type": "text", "text": text or ""}]})


async def answer(request: web.Request, model: str, body: dict[str, Any],
                 used: list[loop.Use]) -> web.StreamResponse:
    app = request.app
    body = _without_ours(body)
    ask = anthropic_chat.asked(body)
    chat = anthropic_chat.request(body)
    sink = _Sink(request, ask, model)
    await sink.begin()
    try:
        outcome = await loop.run(app, app[MCP_SERVERS], app[SCHEDULER].config.mcp, model,
                                 chat, used, sink)
    except CorralError as e:
        if sink.out.response is None:
            raise
        await sink.out.response.write(stream_error_event(e, "anthropic"))
        await sink.out.response.write_eof()
        return sink.out.response
    final = outcome.answer
    if not sink.stream:
        out = anthropic_chat.response(final, ask)
        out["content"] = [*sink.blocks, *out["content"]]
        return web.Response(body=jsonc.dumps(out), content_type="application/json",
                            headers={MODEL_HEADER: model})
    machine = sink.machine
    # The text came as it was generated.
    await sink.out.write(machine.feed(as_chunk(final, text=False)) + machine.finish())
    assert sink.out.response is not None
    await sink.out.response.write_eof()
    return sink.out.response

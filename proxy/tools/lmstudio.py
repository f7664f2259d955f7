"""The tool loop for LM Studio's REST v1 chat: ``integrations`` (``POST /api/v1/chat``).

An integration names a configured server: ``"NAME"`` or ``"mcp/NAME"`` (a plugin id),
``{"type": "plugin", "id": ..., "allowed_tools": [...]}``, or ``{"type":
"ephemeral_mcp", "server_label": NAME}`` whose ``server_url``, if given, must be the
configured one (``headers`` are refused: the config holds them). Calls show as LM
Studio's own events, as they happen: ``tool_call.start``, ``tool_call.arguments``,
``tool_call.result`` (a failed call's output is its error), and ``tool_call`` items in
the result's ``output`` before the message, as LM Studio's own server answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.dialects.chat_store import ChatStore
from proxy.edge import jsonc, reqlog
from proxy.edge.errors import public_message
from proxy.keys import CHAT_STORE, MCP_SERVERS, SCHEDULER
from proxy.tools import loop
from proxy.tools.calls import McpCall
from proxy.tools.client import Tool
from proxy.tools.items import names, no_url
from proxy.tools.servers import Servers
from scheduler.errors import BadRequest, CorralError


def uses(payload: dict[str, Any], servers: Servers
         ) -> tuple[list[loop.Use], dict[str, dict[str, Any]]]:
    """The servers the integrations name, and each one's ``provider_info``."""
    given = payload.get("integrations")
    if not isinstance(given, list):
        raise BadRequest("'integrations' must be a list")
    out: list[loop.Use] = []
    info: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(given):
        allowed = None
        if isinstance(entry, str):
            name, provider = entry.removeprefix("mcp/"), {"type": "plugin", "plugin_id": entry}
        elif isinstance(entry, dict) and entry.get("type") == "plugin" and isinstance(
                entry.get("id"), str):
            name = entry["id"].removeprefix("mcp/")
            provider = {"type": "plugin", "plugin_id": entry["id"]}
            allowed = names(entry.get("allowed_tools"), f"integrations[{i}].allowed_tools")
        elif isinstance(entry, dict) and entry.get("type") == "ephemeral_mcp" and isinstance(
                entry.get("server_label"), str):
            name = entry["server_label"]
            no_url(servers, name, entry.get("server_url"), f"integrations[{i}].server_url")
            if entry.get("headers"):
                raise BadRequest(f"integrations[{i}].headers: the config holds a server's "
                                 "headers")
            provider = {"type": "ephemeral_mcp", "server_label": name}
            allowed = names(entry.get("allowed_tools"), f"integrations[{i}].allowed_tools")
        else:
            raise BadRequest(f"integrations[{i}] must name a configured MCP server")
        cfg = servers.configured(name)
        if cfg is not None and cfg.require_approval == "always":
            raise BadRequest(f"MCP server {name!r} needs approval for each call, which this "
                             "API has no step for (use the Responses API)")
        out.append(loop.Use(name, allowed))
        info[name] = provider
    return out, info


class _Sink:
    def __init__(self, request: web.Request, stream: bool,
                 info: dict[str, dict[str, Any]]) -> None:
        self.request = request
        self.stream = stream
        self.info = info
        self.response: web.StreamResponse | None = None
        self.items: list[dict[str, Any]] = []
        # A message.start was sent and its message.end not yet.
        self.speaking = False

    async def send(self, name: str, data: dict[str, Any]) -> None:
        if not self.stream:
            return
        if self.response is None:
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                              "Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
            await out.prepare(self.request)
            self.response = out
        await self.response.write(b"event: " + name.encode() + b"\ndata: "
                                  + jsonc.dumps({"type": name, **data}) + b"\n\n")

    async def listed(self, server: str, tools: list[Tool], error: str | None) -> None:
        if error is not None:
            await self.send("error", {"error": {"type": "mcp_connection_error",
                                                "message": f"{server}: {error}"}})

    async def text(self, delta: dict[str, Any]) -> None:
        if delta.get("content"):
            if not self.speaking:
                self.speaking = True
                await self.send("message.start", {})
            await self.send("message.delta", {"content": delta["content"]})

    async def hush(self) -> None:
        if self.speaking:
            self.speaking = False
            await self.send("message.end", {})

    async def calling(self, call: McpCall) -> None:
        await self.hush()
        provider = self.info.get(call.server, {})
        await self.send("tool_call.start", {"tool": call.name, "provider_info": provider})
        await self.send("tool_call.arguments", {"tool": call.name, "arguments": call.args(),
                                                "provider_info": provider})

    async def called(self, call: McpCall) -> None:
        item = {"type": "tool_call", "tool": call.name, "arguments": call.args(),
                "output": call.output if call.error is None else f"Error: {call.error}",
                "provider_info": self.info.get(call.server, {})}
        self.items.append(item)
        await self.send("tool_call.result", {k: v for k, v in item.items() if k != "type"})


# lmstudio_chat.request_body: (model, chat body) of a request, integrations left out.
RequestBody = Callable[[dict[str, Any], ChatStore], tuple[str, dict[str, Any]]]


async def answer(request: web.Request, payload: dict[str, Any],
                 request_body: RequestBody) -> web.StreamResponse:
    app = request.app
    servers = app[MCP_SERVERS]
    used, info = uses(payload, servers)
    model, body = request_body(
        {k: v for k, v in payload.items() if k != "integrations"}, app[CHAT_STORE])
    app[SCHEDULER].resolve(model)  # an unknown model is a 404 before any event
    if payload.get("tool_choice") in ("auto", "none", "required"):
        # An extension beside integrations: LM Studio's v1 chat has no tool_choice.
        body["tool_choice"] = payload["tool_choice"]
    loop.check_uses(app, servers, model, [u.server for u in used])
    stream = payload.get("stream") is True
    sink = _Sink(request, stream, info)
    started = time.perf_counter()
    await sink.send("chat.start", {"model_instance_id": model})
    try:
        outcome = await loop.run(app, servers, app[SCHEDULER].config.mcp, model, body, used,
                                 sink)
    except CorralError as e:
        if sink.response is None:
            raise
        await sink.send("error", {"error": {"type": "unknown", "message": public_message(e)}})
        await sink.response.write_eof()
        return sink.response
    message = (outcome.answer.get("choices") or [{}])[0].get("message") or {}
    text = message.get("content") or ""
    await sink.hush()  # the text came as it was generated (Sink.text)
    usage = outcome.usage
    result: dict[str, Any] = {
        "model_instance_id": model,
        "output": [*sink.items, {"type": "message", "content": text}],
        "stats": {"input_tokens": usage["prompt_tokens"],
                  "total_output_tokens": usage["completion_tokens"],
                  "reasoning_output_tokens": 0, "tokens_per_second": 0.0,
                  "time_to_first_token_seconds": round(time.perf_counter() - started, 4)}}
    if payload.get("store", True) is not False:
        messages = [*body["messages"], {"role": "assistant", "content": text}]
        result["response_id"] = app[CHAT_STORE].put(messages)
    if not stream:
        return web.json_response(result)
    reqlog.mark_ended()
    await sink.send("chat.end", {"result": result})
    assert sink.response is not None
    await sink.response.write_eof()
    return sink.response

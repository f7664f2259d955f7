"""What every adapter shares: the MCP items in OpenAI's shapes (Responses output items,
which the chat extension reuses), the names a call gives, the SSE writer. Pure but for
``Out``, which owns one streamed answer's response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.dialects.families import Event
from proxy.dialects.families.chat import choice, new_id
from proxy.edge import jsonc
from proxy.metrics.registry import MODEL_HEADER
from proxy.tools.calls import McpCall
from proxy.tools.client import Tool
from proxy.tools.servers import Servers
from scheduler.errors import BadRequest


def list_tools_item(server: str, tools: list[Tool], error: str | None) -> dict[str, Any]:
    return {"type": "mcp_list_tools", "id": new_id("mcpl_"), "server_label": server,
            "tools": [t.wire() for t in tools], "error": error}


def call_item(call: McpCall, done: bool) -> dict[str, Any]:
    status = ("failed" if call.error is not None else "completed") if done else "in_progress"
    error: dict[str, Any] | None = None
    if done and call.error is not None:
        # The tool said it failed (isError), or no answer came (protocol, timeout).
        error = ({"type": "mcp_tool_execution_error",
                  "content": [{"type": "text", "text": call.error}]} if call.tool_failed
                 else {"type": "mcp_protocol_error", "code": -32000, "message": call.error})
    return {"type": "mcp_call", "id": "mcp_" + call.id, "server_label": call.server,
            "name": call.name, "arguments": call.arguments, "output": call.output,
            "error": error, "status": status, "approval_request_id": None}


def approval_item(call: McpCall) -> dict[str, Any]:
    return {"type": "mcp_approval_request", "id": "mcpr_" + call.id,
            "server_label": call.server, "name": call.name, "arguments": call.arguments}


def names(value: Any, field: str) -> frozenset[str] | None:
    """An ``allowed_tools`` value: a list of names, or ``{"tool_names": [...]}``."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("tool_names")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{field} must be a list of tool names")
    return frozenset(value)


def no_url(servers: Servers, name: str, url: Any, field: str) -> None:
    """A client names a configured server; a URL is refused unless it is the one the
    config gives that server, so no call makes Corral connect anywhere new."""
    if url is None:
        return
    cfg = servers.configured(name)
    if cfg is None or cfg.url is None or url != cfg.url:
        raise BadRequest(f"{field}: Corral calls only the MCP servers of its config, by "
                         f"name; leave the URL out and name a configured server")


def as_chunk(answer: dict[str, Any], text: bool = True) -> dict[str, Any]:
    """A whole chat answer as the one chunk of a stream (usage included); without its
    text when that was streamed already (``text=False``)."""
    c = choice(answer)
    msg = c.get("message") or {}
    delta: dict[str, Any] = {"role": "assistant"}
    if text:
        delta.update({k: msg[k] for k in ("content", "reasoning_content") if msg.get(k)})
    calls = msg.get("tool_calls")
    if isinstance(calls, list) and calls:
        delta["tool_calls"] = [{**tc, "index": i} for i, tc in enumerate(calls)
                               if isinstance(tc, dict)]
    return {"id": answer.get("id"), "object": "chat.completion.chunk",
            "created": answer.get("created"), "model": answer.get("model"),
            "usage": answer.get("usage"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": c.get("finish_reason")}]}


@dataclass(slots=True)
class Out:
    """One streamed answer: prepared on its first write, SSE frames after."""

    request: web.Request
    model: str
    response: web.StreamResponse | None = None

    async def write(self, events: list[Event]) -> None:
        if not events:
            return
        if self.response is None:
            out = web.StreamResponse(headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no",
                                              MODEL_HEADER: self.model})
            out.content_type = "text/event-stream"
            await out.prepare(self.request)
            self.response = out
        await self.response.write(encode(events))


def encode(events: list[Event]) -> bytes:
    return b"".join(
        (b"event: " + name.encode() + b"\n" if name else b"") + b"data: "
        + jsonc.dumps(data) + b"\n\n"
        for name, data in events)

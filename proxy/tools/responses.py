"""The tool loop for OpenAI Responses: ``tools: [{"type": "mcp", "server_label": NAME}]``.

Output items and stream events are OpenAI's own: an ``mcp_list_tools`` item per server
(``response.mcp_list_tools.in_progress``/``completed``/``failed``), an ``mcp_call`` item
per call (``response.mcp_call.in_progress``, ``response.mcp_call_arguments.delta``/
``done``, ``response.mcp_call.completed``/``failed``), then the model's answer as the
translated family gives it (proxy/dialects/families/responses_chat.py). A tool that
needs approval (``require_approval``, or the server's config) ends the response with
``mcp_approval_request`` items; the next call's ``mcp_approval_response`` input items
resume the loop. MCP items a client sends back as input are Corral's own: dropped.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.dialects.families import responses_chat
from proxy.edge import jsonc
from proxy.edge.errors import stream_error_event
from proxy.keys import FAMILIES, MCP_APPROVALS, MCP_SERVERS, SCHEDULER
from proxy.metrics.registry import MODEL_HEADER
from proxy.tools import loop
from proxy.tools.calls import McpCall
from proxy.tools.client import Tool
from proxy.tools.items import Out, approval_item, as_chunk, call_item, list_tools_item, names
from proxy.tools.items import no_url as refuse_url
from proxy.tools.servers import Servers
from scheduler.errors import BadRequest, CorralError

_OURS = ("mcp_list_tools", "mcp_call", "mcp_approval_request")


def uses(body: dict[str, Any], servers: Servers) -> list[loop.Use]:
    tools = body.get("tools")
    out = []
    for i, t in enumerate(tools if isinstance(tools, list) else []):
        if not isinstance(t, dict) or t.get("type") != "mcp":
            continue
        name = t.get("server_label")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"tools[{i}]: an mcp tool needs 'server_label', the name of a "
                             "configured MCP server")
        refuse_url(servers, name, t.get("server_url"), f"tools[{i}].server_url")
        if t.get("connector_id") is not None:
            raise BadRequest(f"tools[{i}].connector_id: Corral has no connectors; name a "
                             "configured MCP server")
        cfg = servers.configured(name)
        always = cfg is not None and cfg.require_approval == "always"
        out.append(loop.Use(name, names(t.get("allowed_tools"), f"tools[{i}].allowed_tools"),
                            _approval(t.get("require_approval"), always, i)))
    return out


def _approval(value: Any, always: bool, i: int) -> Any:
    if always or value == "always":
        return lambda tool: True
    if value is None or value == "never":
        return lambda tool: False
    if isinstance(value, dict):
        ask = names(value.get("always"), f"tools[{i}].require_approval.always")
        skip = names(value.get("never"), f"tools[{i}].require_approval.never")
        if ask is not None:
            return lambda tool: tool in ask
        if skip is not None:
            return lambda tool: tool not in skip
        return lambda tool: True
    raise BadRequest(f"tools[{i}].require_approval must be 'always', 'never' or an object")


def _input(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
    """The body without Corral's own MCP items, and the approvals it carries."""
    given = body.get("input")
    if not isinstance(given, list):
        return body, {}
    approvals: dict[str, bool] = {}
    kept = []
    for item in given:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "mcp_approval_response":
            approvals[str(item.get("approval_request_id"))] = item.get("approve") is True
        elif kind not in _OURS:
            kept.append(item)
    return {**body, "input": kept}, approvals


class _Sink:
    def __init__(self, request: web.Request, ask: responses_chat.Asked, model: str) -> None:
        self.stream = ask.stream
        self.machine = responses_chat.Stream(ask)
        self.out = Out(request, model)
        self.items: list[dict[str, Any]] = []
        # Where each item sits in the machine's output too (streamed text between).
        self._at: list[int] = []
        self._open: dict[str, int] = {}

    async def begin(self) -> None:
        if self.stream:
            await self.out.write(self.machine.start({"model": self.machine.ask.model}))

    def _event(self, kind: str, **data: Any) -> Any:
        return self.machine._event(kind, **data)

    async def text(self, delta: dict[str, Any]) -> None:
        await self.out.write(self.machine.feed({"choices": [{"index": 0, "delta": delta}]}))

    def _add(self, item: dict[str, Any], closed: list[Any]) -> tuple[int, int]:
        """(index in ``items``, output index): a streamed text item still open is
        closed first (its events into ``closed``), as it comes before this one."""
        self.machine._close(closed)
        self.items.append(item)
        # The machine numbers its own items after these, and lists them all at the end.
        self._at.append(len(self.machine._done))
        self.machine._done.append(item)
        return len(self.items) - 1, self._at[-1]

    async def listed(self, server: str, tools: list[Tool], error: str | None) -> None:
        item = list_tools_item(server, tools, error)
        closed: list[Any] = []
        _, index = self._add(item, closed)
        if not self.stream:
            return
        common = {"item_id": item["id"], "output_index": index}
        await self.out.write([
            *closed,
            self._event("response.output_item.added", output_index=index,
                        item={**item, "tools": []}),
            self._event("response.mcp_list_tools.in_progress", **common),
            self._event("response.mcp_list_tools.failed" if error else
                        "response.mcp_list_tools.completed", **common),
            self._event("response.output_item.done", output_index=index, item=item)])

    async def calling(self, call: McpCall) -> None:
        item = call_item(call, done=False)
        closed: list[Any] = []
        mine, index = self._add(item, closed)
        self._open[call.id] = mine
        if not self.stream:
            return
        common = {"item_id": item["id"], "output_index": index}
        await self.out.write([
            *closed,
            self._event("response.output_item.added", output_index=index, item=item),
            self._event("response.mcp_call.in_progress", **common),
            self._event("response.mcp_call_arguments.delta", **common, delta=call.arguments),
            self._event("response.mcp_call_arguments.done", **common,
                        arguments=call.arguments)])

    async def called(self, call: McpCall) -> None:
        item = call_item(call, done=True)
        mine = self._open.pop(call.id, None)
        if mine is None:  # resumed after approval: not announced yet
            await self.calling(call)
            mine = self._open.pop(call.id)
        index = self._at[mine]
        self.items[mine] = item
        self.machine._done[index] = item
        if not self.stream:
            return
        common = {"item_id": item["id"], "output_index": index}
        await self.out.write([
            self._event("response.mcp_call.failed" if call.error is not None else
                        "response.mcp_call.completed", **common),
            self._event("response.output_item.done", output_index=index, item=item)])

    async def approvals(self, calls: list[McpCall]) -> None:
        for call in calls:
            item = approval_item(call)
            closed: list[Any] = []
            _, index = self._add(item, closed)
            if self.stream:
                await self.out.write([
                    *closed,
                    self._event("response.output_item.added", output_index=index, item=item),
                    self._event("response.output_item.done", output_index=index, item=item)])


async def answer(request: web.Request, model: str, body: dict[str, Any],
                 used: list[loop.Use]) -> web.StreamResponse:
    app = request.app
    body, approved = _input(body)
    resume = None
    if approved:
        pending = next((p for p in (app[MCP_APPROVALS].take(i) for i in approved)
                        if p is not None), None)
        if pending is None:
            raise BadRequest("mcp_approval_response: no approval request with that id is "
                             "waiting (it was answered, or forgotten)")
        resume = (pending, {k.removeprefix("mcpr_"): v for k, v in approved.items()})
        if body.get("previous_response_id"):
            body = {k: v for k, v in body.items() if k != "previous_response_id"}
    ask = responses_chat.asked(body)
    if resume is not None and not body.get("input"):
        chat = dict(resume[0].chat)
    else:
        previous = None
        if body.get("previous_response_id"):
            previous = app[FAMILIES].responses.get(str(body["previous_response_id"]))
        chat = responses_chat.request(body, previous)
    sink = _Sink(request, ask, model)
    await sink.begin()
    try:
        outcome = await loop.run(app, app[MCP_SERVERS], app[SCHEDULER].config.mcp, model,
                                 chat, used,
                                 sink, resume)
    except CorralError as e:
        if sink.out.response is None:
            raise
        await sink.out.response.write(stream_error_event(e, "responses"))
        await sink.out.response.write_eof()
        return sink.out.response
    if outcome.pending is not None:
        app[MCP_APPROVALS].put(outcome.pending,
                               [approval_item(c)["id"] for c in outcome.approvals])
        await sink.approvals(outcome.approvals)
    final = outcome.answer
    kept = responses_chat.history(body, chat, responses_chat.assistant(final))
    if not sink.stream:
        out = responses_chat.response(final, ask)
        if kept is not None:
            # A later call's previous_response_id finds the conversation, as the
            # family bridge keeps it (the tool turns left out).
            app[FAMILIES].responses.put(kept, str(out["id"]))
        out["output"] = [*sink.items, *out["output"]]
        if outcome.approvals:
            # Only the approval requests: the model's text came with its tool calls.
            out["output"] = [o for o in out["output"] if o.get("type") != "message"
                             or (o["content"] and o["content"][0].get("text"))]
        return web.Response(body=jsonc.dumps(out), content_type="application/json",
                            headers={MODEL_HEADER: model})
    chunk = as_chunk(final, text=False)  # its text came as it was generated
    machine = sink.machine
    if kept is not None:
        app[FAMILIES].responses.put(kept, machine.id)
    await sink.out.write(machine.feed(chunk) + machine.finish())
    assert sink.out.response is not None
    await sink.out.response.write_eof()
    return sink.out.response


"""The tool loop, the same for every family: over one OpenAI chat call.

A family's adapter translates its request to a chat body and names the configured
servers it uses (``Use``). ``run()`` lists their tools to the model as function tools
(``SERVER__TOOL``), sends the chat call through the one upstream path (so each step is
leased, queued, timed and counted like any call), runs every tool call the model makes
for those tools, feeds the results back as ``tool`` messages and goes round again until
the model answers without one, or a bound of ``[mcp]`` is reached (steps, seconds,
completion tokens). Each event reaches the adapter's ``Sink`` as it happens, so a
stream shows it at once; for a streaming client each turn streams upstream and its
text reaches ``Sink.text`` token by token, its tool calls gathered from their deltas.
A tool that fails, times out or whose server cannot start becomes a failed result the
model reads, never a 5xx. A call that needs the client's approval ends the loop;
``Pending`` keeps what a later call's approval resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from proxy.calls import upstream
from proxy.calls.call import Call, Client
from proxy.calls.streaming import upstream_batches
from proxy.dialects.families.chat import ToolDeltas, choice, finish_reason, new_id
from proxy.dialects.translate import upstream_error_body
from proxy.edge import jsonc, reqlog
from proxy.keys import CALLS
from proxy.tools.calls import McpCall, Pending
from proxy.tools.client import McpError, Tool
from proxy.tools.servers import Running, Servers
from scheduler.config.tools import McpConfig
from scheduler.errors import BadRequest, UpstreamFailed
from scheduler.keys import tenants
from scheduler.scheduling.scheduler import Upstream

CHAT_PATH = "/v1/chat/completions"
SEP = "__"
DENIED = "The user did not approve this tool call."
# What a capture keeps of a tool call's arguments and error, in characters.
CAPTURE_CUT = 2048


@dataclass(frozen=True, slots=True)
class Use:
    """A configured server a call names, with the client's own narrowing."""

    server: str
    # Tools the client allows (None: every tool the config offers).
    allowed: frozenset[str] | None = None
    # Whether a call of a tool needs the client's approval first.
    approval: Callable[[str], bool] = lambda tool: False


class Sink(Protocol):
    """What an adapter shows of the loop, as it happens."""

    async def listed(self, server: str, tools: list[Tool], error: str | None) -> None: ...

    async def calling(self, call: McpCall) -> None: ...

    async def called(self, call: McpCall) -> None: ...

    # A streaming client's sink: each turn streams upstream and its text reaches
    # ``text`` as it comes, so the adapter leaves it out of the final answer.
    stream: bool

    async def text(self, delta: dict[str, Any]) -> None:
        """A chat delta of the model's text (``content`` and/or ``reasoning_content``)."""


@dataclass(slots=True)
class Outcome:
    # The last chat answer, the MCP tool calls taken out of its message.
    answer: dict[str, Any]
    calls: list[McpCall] = field(default_factory=list)
    # None: the model answered; else the bound that ended the loop.
    stopped: str | None = None
    # Calls that wait for approval (Pending holds how to resume them).
    approvals: list[McpCall] = field(default_factory=list)
    pending: Pending | None = None
    # Tokens over every step.
    usage: dict[str, int] = field(default_factory=lambda: {
        "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})

    def end(self, answer: dict[str, Any], mine: list[dict[str, Any]],
            reason: str | None = None) -> Outcome:
        self.answer = _without(answer, {id(c) for c in mine}, reason)
        self.answer["usage"] = dict(self.usage)
        return self


def check_uses(app: web.Application, servers: Servers, model: str, names: list[str]) -> None:
    """A 400 in the caller's dialect for a server that is not configured, that this
    key may not use, or that the model may not: before anything is started."""
    key = tenants.current()
    for name in names:
        cfg = servers.configured(name)
        if cfg is None or (key is not None and not tenants.may_use(key.mcp_servers, [name])):
            known = [s for s in servers.names()
                     if key is None or tenants.may_use(key.mcp_servers, [s])]
            raise BadRequest(f"no MCP server named {name!r} is configured for this key "
                             f"(servers are named in the config only; configured: {known})")
        if not tenants.may_use(cfg.models, [model]):
            raise BadRequest(f"MCP server {name!r} is not offered to model {model!r}")


async def run(app: web.Application, servers: Servers, bounds: McpConfig, model: str,
              chat: dict[str, Any], uses: list[Use], sink: Sink,
              resume: tuple[Pending, dict[str, bool]] | None = None) -> Outcome:
    """Run the loop; see the module docstring. With captures on, the record of the
    client's call lists its tool calls (``Record.tools``)."""
    calls = app.get(CALLS)
    store = calls.captures if calls is not None else None
    info = reqlog.current()
    if store is None or info is None:
        return await _run(app, servers, bounds, model, chat, uses, sink, resume, None)
    log: list[dict[str, Any]] = []
    store.tool_logs[info.id] = log
    try:
        return await _run(app, servers, bounds, model, chat, uses, sink, resume, log)
    finally:
        if store.tool_logs.get(info.id) is log:
            del store.tool_logs[info.id]


async def _run(app: web.Application, servers: Servers, bounds: McpConfig, model: str,
               chat: dict[str, Any], uses: list[Use], sink: Sink,
               resume: tuple[Pending, dict[str, bool]] | None,
               log: list[dict[str, Any]] | None) -> Outcome:
    started = time.monotonic()
    deadline = started + bounds.max_seconds
    offered: dict[str, tuple[Use, Running, Tool]] = {}
    for use in uses:
        try:
            running = await servers.get(use.server)
        except (McpError, OSError, TimeoutError) as e:
            await sink.listed(use.server, [], str(e) or type(e).__name__)
            continue
        tools = [t for t in running.offered if use.allowed is None or t.name in use.allowed]
        await sink.listed(use.server, tools, None)
        for tool in tools:
            offered[f"{use.server}{SEP}{tool.name}"] = (use, running, tool)
    body = {k: v for k, v in chat.items() if k not in ("stream", "stream_options")}
    body["stream"] = sink.stream
    if sink.stream:
        body["stream_options"] = {"include_usage": True}
    body["tools"] = [*(body.get("tools") or []), *(_function(n, t) for n, (_, _, t)
                                                   in offered.items())]
    if not body["tools"]:
        del body["tools"]
    messages = list(body.pop("messages", None) or [])
    out = Outcome(answer={})
    answer: dict[str, Any] = {}
    mine: list[dict[str, Any]] = []
    if resume is not None:
        pending, approved = resume
        body.pop("tool_choice", None)
        messages = list(pending.messages)
        for call in pending.calls:
            if approved.get(call.id, False) and f"{call.server}{SEP}{call.name}" in offered:
                await _run_call(servers, call, offered, deadline, sink)
            else:
                call.error = DENIED
            out.calls.append(call)
            _logged(log, call)
            messages.append(_tool_message(call, bounds))
    for _ in range(bounds.max_steps):
        answer = await _step(app, model, {**body, "messages": messages}, sink)
        _add_usage(out, answer)
        msg = choice(answer).get("message") or {}
        calls = [c for c in msg.get("tool_calls") or [] if isinstance(c, dict)]
        mine = [c for c in calls if (c.get("function") or {}).get("name") in offered]
        if not mine or len(mine) < len(calls):
            # An answer, or a call of the client's own tools: the client's turn.
            return out.end(answer, mine)
        messages.append({"role": "assistant", "content": msg.get("content") or None,
                         "tool_calls": mine})
        batch = [_as_call(c, offered) for c in mine]
        needing = [c for c in batch if offered[f"{c.server}{SEP}{c.name}"][0].approval(c.name)]
        if needing:
            for c in batch:
                c.pending = True
                _logged(log, c)
            out.approvals = batch
            out.pending = Pending(model, chat, messages, batch)
            return out.end(answer, mine, "stop")
        for call in batch:
            await _run_call(servers, call, offered, deadline, sink)
            out.calls.append(call)
            _logged(log, call)
            messages.append(_tool_message(call, bounds))
        if body.get("tool_choice") not in (None, "auto", "none"):
            # A forced call ("required", a named tool) binds the first turn: forced on
            # every turn, the model could never answer the results.
            body["tool_choice"] = "auto"
        stop = ("max_seconds" if time.monotonic() >= deadline else
                "max_tokens" if bounds.max_tokens is not None
                and out.usage["completion_tokens"] >= bounds.max_tokens else None)
        if stop is not None:
            out.stopped = stop
            return out.end(answer, mine, "length")
    out.stopped = "max_steps"
    return out.end(answer, mine, "length")


def _function(name: str, tool: Tool) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": name, "parameters": tool.input_schema or {"type": "object"}}
    if tool.description:
        fn["description"] = tool.description
    return {"type": "function", "function": fn}


def _as_call(c: dict[str, Any], offered: dict[str, tuple[Use, Running, Tool]]) -> McpCall:
    fn = c.get("function") or {}
    use, _, tool = offered[fn["name"]]
    args = fn.get("arguments")
    text = args if isinstance(args, str) else json.dumps(args or {})
    return McpCall(str(c.get("id") or new_id("call_")), use.server, tool.name, text or "{}")


async def _run_call(servers: Servers, call: McpCall,
                    offered: dict[str, tuple[Use, Running, Tool]], deadline: float,
                    sink: Sink) -> None:
    _, running, _ = offered[f"{call.server}{SEP}{call.name}"]
    await sink.calling(call)
    began = time.monotonic()
    timeout = max(0.001, min(running.cfg.call_timeout, deadline - began))
    running.busy += 1
    outcome = "failed"
    try:
        result = await running.session.call(call.name, call.args(), timeout)
        if result.is_error:
            call.error = result.text or "the tool failed"
            call.tool_failed = True
            outcome = "error"
        else:
            call.output = result.text
            outcome = "ok"
    except (McpError, OSError, aiohttp.ClientError) as e:
        call.error = str(e) or type(e).__name__
    finally:
        running.busy -= 1
        running.used = time.monotonic()
        call.seconds = time.monotonic() - began
    if servers.on_call is not None:
        servers.on_call(call.server, call.name, outcome, call.seconds)
    await sink.called(call)


def _logged(log: list[dict[str, Any]] | None, call: McpCall) -> None:
    """A call as the capture of the client's call lists it (arguments and errors cut)."""
    if log is None:
        return
    outcome = ("pending" if call.pending else "denied" if call.error == DENIED else
               "ok" if call.error is None else "error" if call.tool_failed else "failed")
    entry: dict[str, Any] = {"id": call.id, "server": call.server, "tool": call.name,
                             "arguments": _cut(call.arguments), "outcome": outcome,
                             "seconds": round(call.seconds, 4)}
    if call.error is not None:
        entry["error"] = _cut(call.error)
    log.append(entry)


def _cut(text: str) -> str:
    if len(text) <= CAPTURE_CUT:
        return text
    return f"{text[:CAPTURE_CUT]}[cut: {len(text) - CAPTURE_CUT} more characters]"


def _tool_message(call: McpCall, bounds: McpConfig) -> dict[str, Any]:
    text = call.output if call.error is None else f"Error: {call.error}"
    text = text or ""
    if len(text) > bounds.max_result_chars:
        text = text[:bounds.max_result_chars] + "\n[cut: the result was longer]"
    return {"role": "tool", "tool_call_id": call.id, "content": text}


def _add_usage(out: Outcome, answer: dict[str, Any]) -> None:
    usage = answer.get("usage")
    if not isinstance(usage, dict):
        return
    for k in ("prompt_tokens", "completion_tokens"):
        n = usage.get(k)
        out.usage[k] += n if isinstance(n, int) and not isinstance(n, bool) else 0
    out.usage["total_tokens"] = out.usage["prompt_tokens"] + out.usage["completion_tokens"]


def _without(answer: dict[str, Any], mine: set[int], reason: str | None = None
             ) -> dict[str, Any]:
    """``answer`` with the MCP tool calls taken out (the client never runs them)."""
    c = dict(choice(answer))
    msg = dict(c.get("message") or {})
    rest = [t for t in msg.get("tool_calls") or [] if id(t) not in mine]
    if rest:
        msg["tool_calls"] = rest
    else:
        msg.pop("tool_calls", None)
        if c.get("finish_reason") == "tool_calls":
            c["finish_reason"] = "stop"
    if msg.get("content") is None:
        msg["content"] = ""
    if reason is not None:
        c["finish_reason"] = reason
    c["message"] = msg
    out = {**answer, "choices": [c]}
    return out


async def _step(app: web.Application, model: str, body: dict[str, Any],
                sink: Sink) -> dict[str, Any]:
    spec = Call(model=model, path=CHAT_PATH, payload=body)
    if not body.get("stream"):
        return await upstream.call_app(app, spec, read_answer)

    async def read(up: Upstream, resp: aiohttp.ClientResponse,
                   client: Client) -> dict[str, Any]:
        return await read_stream(up, resp, client, sink)

    return await upstream.call_app(app, spec, read)


async def read_stream(up: Upstream, resp: aiohttp.ClientResponse, client: Client,
                      sink: Sink) -> dict[str, Any]:
    """The consumer of a streamed chat turn: its text goes to ``sink.text`` as it
    arrives; the turn comes back assembled as a whole answer (its tool calls from
    their deltas), so the loop decides on it as on a whole one."""
    if resp.status >= 400:
        raise upstream_error_body(resp.status, await resp.read())
    head: dict[str, Any] = {}
    text = {"content": "", "reasoning_content": ""}
    tools = ToolDeltas()
    reason: str | None = None
    usage: Any = None
    async for batch in upstream_batches(resp, up.instance_id):
        for chunk in batch:
            if "error" in chunk:
                error = chunk["error"]
                said_ = error.get("message") if isinstance(error, dict) else error
                raise UpstreamFailed(f"model '{up.model}': {said_ or 'the stream failed'}")
            head = head or {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
            usage = chunk.get("usage") or usage
            c = choice(chunk)
            delta = c.get("delta") or {}
            said = {k: delta[k] for k in text if isinstance(delta.get(k), str) and delta[k]}
            if said:
                # Committed: a turn that breaks now is not sent again (the client would
                # see its text twice); it ends the client's stream with an error.
                client.answered = True
                for k, v in said.items():
                    text[k] += v
                await sink.text(said)
            tools.feed(delta.get("tool_calls"))
            reason = finish_reason(c) or reason
    message: dict[str, Any] = {"role": "assistant", "content": text["content"] or None}
    if text["reasoning_content"]:
        message["reasoning_content"] = text["reasoning_content"]
    if tools.calls:
        message["tool_calls"] = [
            {"id": t.id, "type": "function",
             "function": {"name": t.name, "arguments": t.arguments or "{}"}}
            for _, t in sorted(tools.calls.items())]
    return {**head, "object": "chat.completion", "usage": usage,
            "choices": [{"index": 0, "message": message, "finish_reason": reason}]}


async def read_answer(up: Upstream, resp: aiohttp.ClientResponse,
                      client: Client) -> dict[str, Any]:
    """The consumer of a whole chat answer: its JSON, or the upstream's error."""
    raw = await resp.read()
    if resp.status >= 400:
        raise upstream_error_body(resp.status, raw)
    answer = jsonc.loads(raw)
    if not isinstance(answer, dict):
        raise UpstreamFailed(f"model '{up.model}': the chat answer is not a JSON object")
    return answer

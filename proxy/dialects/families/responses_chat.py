"""OpenAI Responses <-> chat completions. Pure: dicts in, dicts out. Input items, tools
and tool_choice as chat's: ``responses_input.py``.

Requests: ``instructions`` becomes a system message; ``input`` (a string, or items:
messages with ``input_text``/``input_image`` parts, ``function_call``,
``function_call_output``) becomes chat messages, consecutive function calls one
assistant turn; ``reasoning`` items are dropped. What needs state or tools that only
OpenAI runs is refused with a 400 (``item_reference`` items, ``input_file`` parts) or
left out (built-in tools: ``web_search``, ``file_search``, ``code_interpreter``, custom
tools, ...; the model works without them); a ``namespace`` tool's functions go to chat
as ``NAMESPACE__NAME`` and their calls come back with ``namespace`` set.
``previous_response_id``
is served from the conversations the bridge keeps (``history``, ``assistant``): the
earlier turns go before the new input, as OpenAI does, without the earlier
``instructions``.

Answers: a ``reasoning`` item for ``reasoning_content``, a ``message`` item for the
text, a ``function_call`` item per tool call (``call_id`` is the chat call's id, so a
``function_call_output`` finds it again); ``finish_reason: "length"`` makes the
response ``incomplete`` (``incomplete_details.reason: "max_output_tokens"``), as
OpenAI's own does. ``Stream`` turns chat chunks into the Responses events, each with
its ``sequence_number``, ending in ``response.completed`` or ``response.incomplete``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from proxy.dialects.families import Event
from proxy.dialects.families.chat import (
    ToolDeltas,
    Usage,
    choice,
    finish_reason,
    force_tool,
    new_id,
    stream_options,
    text,
)
from proxy.dialects.families.chunks import encode
from proxy.dialects.families.responses_input import (
    SEP,
    add_item,
    split_name,
    tool_choice_of,
    tools_of,
)
from scheduler.errors import BadRequest

_SAME = ("temperature", "top_p", "parallel_tool_calls", "user", "seed")


@dataclass(frozen=True, slots=True)
class Asked:
    model: str
    stream: bool
    # Echoed in the response object, as OpenAI does.
    echo: dict[str, Any]
    # Names of the request's namespace tools: their functions go to chat as
    # "NAMESPACE__NAME" and come back split.
    namespaces: frozenset[str] = frozenset()


def asked(body: dict[str, Any]) -> Asked:
    echo = {k: body.get(k) for k in ("instructions", "max_output_tokens", "temperature",
                                      "top_p", "tool_choice", "tools", "metadata",
                                      "parallel_tool_calls", "text", "reasoning")}
    echo["tools"] = echo["tools"] or []
    echo["tool_choice"] = echo["tool_choice"] or "auto"
    echo["metadata"] = echo["metadata"] or {}
    echo["parallel_tool_calls"] = echo["parallel_tool_calls"] is not False
    echo["text"] = echo["text"] or {"format": {"type": "text"}}
    tools = body.get("tools")
    namespaces = frozenset(
        str(t.get("name")) for t in (tools if isinstance(tools, list) else [])
        if isinstance(t, dict) and t.get("type") == "namespace")
    return Asked(str(body.get("model") or ""), body.get("stream") is True, echo, namespaces)


# --- request ------------------------------------------------------------------------------


def request(body: dict[str, Any],
            previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Responses request as a chat completions request; ``previous``: the chat
    messages of the conversation that ``previous_response_id`` names."""
    if body.get("previous_response_id") and previous is None:
        raise BadRequest(f"previous response {body['previous_response_id']!r} not found")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions:
        messages.append({"role": "system", "content": text(instructions, "'instructions'")})
    messages.extend(previous or ())
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for i, item in enumerate(given):
            add_item(item, f"input[{i}]", messages)
    else:
        raise BadRequest("'input' is required and must be a string or a list of items")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if isinstance(body.get("max_output_tokens"), int):
        chat["max_tokens"] = body["max_output_tokens"]
    for key in _SAME:
        if body.get(key) is not None:
            chat[key] = body[key]
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise BadRequest("'tools' must be a list")
        chat["tools"] = [fn for t in tools for fn in tools_of(t)]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = tool_choice_of(body["tool_choice"])
        named = chat["tool_choice"]
        if isinstance(named, dict):
            force_tool(chat, named["function"]["name"])
    if not chat.get("tools"):
        # Only built-in tools were given (or none): nothing for a chat model to call.
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            chat.pop(key, None)
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(
        body.get("reasoning"), dict) else None
    if isinstance(effort, str):
        chat["reasoning_effort"] = effort
    if body.get("stream") is True:
        stream_options(chat)
    return chat


def count_request(body: dict[str, Any],
                  previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """/v1/responses/input_tokens as a one-token chat call: its usage counts the prompt."""
    chat = request({**body, "max_output_tokens": 1, "stream": False}, previous)
    if "tools" in chat:
        chat["tool_choice"] = "none"
    return chat


# --- answer -------------------------------------------------------------------------------


def usage(u: Usage | None) -> dict[str, Any]:
    u = u or Usage()
    return {"input_tokens": u.prompt, "output_tokens": u.completion,
            "total_tokens": u.prompt + u.completion,
            "input_tokens_details": {"cached_tokens": u.cached},
            "output_tokens_details": {"reasoning_tokens": u.reasoning}}


def _envelope(ident: str, ask: Asked, model: str, status: str,
              output: list[dict[str, Any]], u: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": ident, "object": "response", "created_at": int(time.time()), "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
        else None,
        "model": ask.model or model, "output": output, **ask.echo, "usage": u,
    }


def _message(ident: str, content: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": ident, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": content, "annotations": [],
                         "logprobs": []}] if status == "completed" or content else []}


def _reasoning(ident: str, content: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": ident, "summary": [],
            "content": [{"type": "reasoning_text", "text": content}]}


def _call(call_id: str, name: str, args: str, status: str,
          namespaces: frozenset[str] = frozenset()) -> dict[str, Any]:
    name, namespace = split_name(name, namespaces)
    out = {"type": "function_call", "id": "fc_" + call_id, "call_id": call_id, "name": name,
           "arguments": args, "status": status}
    if namespace is not None:
        out["namespace"] = namespace
    return out


def _status(reason: str | None) -> str:
    return "incomplete" if reason == "length" else "completed"


def response(answer: dict[str, Any], ask: Asked) -> dict[str, Any]:
    """A chat completion as a Responses response."""
    c = choice(answer)
    msg = c.get("message") or {}
    output: list[dict[str, Any]] = []
    reasoning = msg.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        output.append(_reasoning(new_id("rs_"), reasoning))
    content = msg.get("content")
    calls = msg.get("tool_calls") or []
    if isinstance(content, str) and (content or not calls):
        output.append(_message(new_id("msg_"), content, "completed"))
    for call in calls:
        fn = call.get("function") or {}
        output.append(_call(str(call.get("id") or new_id("call_")), str(fn.get("name", "")),
                            str(fn.get("arguments") or "{}"), "completed", ask.namespaces))
    # The id is ours, never the upstream's: kept conversations are found by it, and a
    # server may reuse its ids.
    return _envelope(new_id("resp_"), ask, str(answer.get("model", "")),
                     _status(finish_reason(c)), output, usage(Usage.of(answer.get("usage"))))


def count_response(answer: dict[str, Any]) -> dict[str, Any]:
    u = Usage.of(answer.get("usage"))
    return {"object": "response.input_tokens", "input_tokens": u.prompt if u else 0}


def history(body: dict[str, Any], chat: dict[str, Any],
            reply: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The conversation to keep under the response's id (None: ``store: false``): the
    chat messages sent, less the instructions, and the assistant's answer."""
    if body.get("store") is False:
        return None
    sent = chat["messages"][1:] if body.get("instructions") else chat["messages"]
    return [*sent, reply]


def assistant(answer: dict[str, Any]) -> dict[str, Any]:
    """The assistant's chat message of a whole chat answer, reasoning left out."""
    msg = choice(answer).get("message") or {}
    return _assistant(msg.get("content"), msg.get("tool_calls"))


def _assistant(content: Any, calls: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant",
                           "content": content if isinstance(content, str) and content
                           else (None if calls else "")}
    if calls:
        out["tool_calls"] = [{"id": c.get("id"), "type": "function",
                              "function": c.get("function")} for c in calls]
    return out


# --- stream -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Open:
    """The output item being streamed."""

    kind: str  # "message", "reasoning" or "function_call"
    index: int
    item_id: str
    # The text so far, in pieces: joined once when the item closes (adding to a str
    # attribute copies it every time, quadratic in a long answer).
    parts: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""
    # The bytes of a text delta's event between its sequence number and its text.
    head: bytes = b""


@dataclass(slots=True)
class Stream:
    """Chat chunks in, Responses stream events out. ``start()`` once, ``feed()`` per
    chunk, ``finish()`` at the end of the upstream stream."""

    ask: Asked
    _id: str = ""
    _model: str = ""
    _seq: int = 0
    _open: _Open | None = None
    _done: list[dict[str, Any]] = field(default_factory=list)
    _tools: ToolDeltas = field(default_factory=ToolDeltas)
    _tool_items: dict[int, _Open] = field(default_factory=dict)
    _finish: str | None = None
    _usage: Usage | None = None

    def start(self, first: dict[str, Any]) -> list[Event]:
        self._id = new_id("resp_")
        self._model = str(first.get("model", ""))
        base = _envelope(self._id, self.ask, self._model, "in_progress", [], None)
        return [self._event("response.created", response=base),
                self._event("response.in_progress", response=base)]

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        if chunk.get("usage"):
            self._usage = Usage.of(chunk["usage"])
        c = choice(chunk)
        if not c:
            return out
        delta = c.get("delta") or {}
        reasoning = delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            item = self._item("reasoning", out)
            item.parts.append(reasoning)
            out.append(self._event("response.reasoning_text.delta", item_id=item.item_id,
                                   output_index=item.index, content_index=0, delta=reasoning))
        content = delta.get("content")
        if isinstance(content, str) and content:
            item = self._item("message", out)
            item.parts.append(content)
            out.append(self._event("response.output_text.delta", item_id=item.item_id,
                                   output_index=item.index, content_index=0, delta=content,
                                   logprobs=[]))
        for index, new, piece in self._tools.feed(delta.get("tool_calls")):
            call = self._tools.calls[index]
            if new:
                item = self._item("function_call", out, call.id, call.name)
                self._tool_items[index] = item
            item = self._tool_items[index]
            if piece and item is self._open:
                out.append(self._event("response.function_call_arguments.delta",
                                       item_id=item.item_id, output_index=item.index,
                                       delta=piece))
        reason = finish_reason(c)
        if reason is not None:
            self._finish = reason
        return out

    def text_frame(self, text: str) -> bytes | None:
        """The SSE frame of a plain content delta (``chunks.plain_text``) that continues
        the open message, as ``encode(feed(chunk))`` writes it; None: the message must
        open first, so ``feed`` has to see the chunk."""
        item = self._open
        if item is None or item.kind != "message":
            return None
        if not text:
            return b""
        item.parts.append(text)
        seq = self._seq
        self._seq = seq + 1
        if not item.head:
            item.head = (b',"item_id":' + encode(item.item_id) + b',"output_index":'
                         + str(item.index).encode() + b',"content_index":0,"delta":')
        return (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                b'"sequence_number":' + str(seq).encode() + item.head + encode(text)
                + b',"logprobs":[]}\n\n')

    def finish(self) -> list[Event]:
        out: list[Event] = []
        self._close(out)
        status = _status(self._finish)
        final = _envelope(self._id, self.ask, self._model, status, self._done,
                          usage(self._usage))
        out.append(self._event(f"response.{status}", response=final))
        return out

    @property
    def id(self) -> str:
        return self._id

    def assistant(self) -> dict[str, Any]:
        """The assistant's chat message of what was streamed (call ``finish()`` first)."""
        text_ = "".join(o["content"][0]["text"] for o in self._done
                        if o["type"] == "message" and o["content"])
        calls = [{"id": o["call_id"], "function": {
                     # The chat side's name, as the model called it.
                     "name": f"{o['namespace']}{SEP}{o['name']}" if "namespace" in o
                     else o["name"], "arguments": o["arguments"]}}
                 for o in self._done if o["type"] == "function_call"]
        return _assistant(text_, calls)

    def _event(self, kind: str, **data: Any) -> Event:
        event = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return (kind, event)

    def _item(self, kind: str, out: list[Event], call_id: str = "", name: str = "") -> _Open:
        if self._open is not None and self._open.kind == kind and kind != "function_call":
            return self._open
        self._close(out)
        index = len(self._done)
        if kind == "function_call":
            item = _Open(kind, index, "fc_" + call_id, call_id=call_id, name=name)
            added = _call(call_id, name, "", "in_progress", self.ask.namespaces)
        elif kind == "message":
            item = _Open(kind, index, new_id("msg_"))
            added = _message(item.item_id, "", "in_progress")
        else:
            item = _Open(kind, index, new_id("rs_"))
            added = {**_reasoning(item.item_id, ""), "content": []}
        self._open = item
        out.append(self._event("response.output_item.added", output_index=index, item=added))
        if kind == "message":
            out.append(self._event("response.content_part.added", item_id=item.item_id,
                                   output_index=index, content_index=0,
                                   part={"type": "output_text", "text": "", "annotations": [],
                                         "logprobs": []}))
        return item

    def _close(self, out: list[Event]) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        common = {"item_id": item.item_id, "output_index": item.index}
        text_ = "".join(item.parts)
        if item.kind == "message":
            done = _message(item.item_id, text_, "completed")
            out.append(self._event("response.output_text.done", **common, content_index=0,
                                   text=text_, logprobs=[]))
            out.append(self._event("response.content_part.done", **common, content_index=0,
                                   part=done["content"][0]))
        elif item.kind == "function_call":
            args = self._tools_args(item)
            done = _call(item.call_id, item.name, args, "completed", self.ask.namespaces)
            out.append(self._event("response.function_call_arguments.done", **common,
                                   arguments=args))
        else:
            done = _reasoning(item.item_id, text_)
            out.append(self._event("response.reasoning_text.done", **common, content_index=0,
                                   text=text_))
        self._done.append(done)
        out.append(self._event("response.output_item.done", output_index=item.index,
                               item=done))

    def _tools_args(self, item: _Open) -> str:
        for call in self._tools.calls.values():
            if call.id == item.call_id:
                return call.arguments or "{}"
        return "{}"

"""Anthropic Messages <-> chat completions. Pure: dicts in, dicts out.

Requests: ``system`` becomes the first message; ``text`` and ``image`` blocks become
content parts; an assistant's ``tool_use`` blocks its ``tool_calls``; a user's
``tool_result`` blocks ``tool`` messages (placed first: they answer the calls of the
turn before). ``thinking`` blocks are dropped (chat has no field every server reads);
Anthropic's server tools (``web_search_…``, ``bash_…``) cannot run on a chat upstream
and are left out; block types chat has no place for (``document``, ...) are refused
with a 400.

Answers: text and ``tool_calls`` become ``text`` and ``tool_use`` blocks, a reasoning
model's ``reasoning_content`` a ``thinking`` block when the client asked for
thinking, ``finish_reason`` the ``stop_reason`` (``_STOP``), usage its usage.
``Stream`` turns chat chunks into Anthropic's events in their order: message_start,
content_block_start/delta/stop per block, message_delta, message_stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from proxy.dialects.families import Event
from proxy.dialects.families.chat import (
    ToolDeltas,
    Usage,
    arguments,
    choice,
    finish_reason,
    force_tool,
    new_id,
    stream_options,
    text,
)
from proxy.dialects.families.chunks import encode
from scheduler.errors import BadRequest

# chat finish_reason -> Anthropic stop_reason.
_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# Sampling fields with the same name and meaning in both families.
_SAME = ("temperature", "top_p", "top_k")


@dataclass(frozen=True, slots=True)
class Asked:
    """What the answer's translation needs to know of the request."""

    model: str
    stream: bool
    thinking: bool
    stop_sequences: tuple[str, ...] = ()


def asked(body: dict[str, Any]) -> Asked:
    stops = body.get("stop_sequences")
    thinking = body.get("thinking")
    return Asked(
        model=str(body.get("model") or ""),
        stream=body.get("stream") is True,
        thinking=isinstance(thinking, dict) and thinking.get("type") in (
            "enabled", "adaptive") and thinking.get("display") != "omitted",
        stop_sequences=tuple(s for s in stops if isinstance(s, str))
        if isinstance(stops, list) else (),
    )


# --- request ------------------------------------------------------------------------------


def request(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as a chat completions request."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("'messages' is required and must be a list")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("'max_tokens' is required and must be a positive integer")
    out: list[dict[str, Any]] = []
    system = text(body.get("system"), "'system'")
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        out.extend(_message(m, i))
    chat: dict[str, Any] = {"model": body.get("model"), "messages": out,
                            "max_tokens": max_tokens}
    for key in _SAME:
        if key in body:
            chat[key] = body[key]
    stops = body.get("stop_sequences")
    if stops:
        chat["stop"] = stops
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise BadRequest("'tools' must be a list")
        chat["tools"] = [fn for fn in map(_tool, tools) if fn is not None]
        if not chat["tools"]:
            del chat["tools"]
    choice_ = body.get("tool_choice")
    if isinstance(choice_, dict) and "tools" in chat:
        _tool_choice(choice_, chat)
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    if body.get("stream") is True:
        stream_options(chat)
    return chat


def count_request(body: dict[str, Any]) -> dict[str, Any]:
    """/v1/messages/count_tokens as a one-token chat call: its usage counts the prompt,
    template and tools included, on any chat upstream."""
    chat = request({**body, "max_tokens": 1, "stream": False})
    if "tools" in chat:
        chat["tool_choice"] = "none"
    return chat


def _message(m: Any, i: int) -> list[dict[str, Any]]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
        raise BadRequest(f"{where}: 'role' must be 'user', 'assistant' or 'system'")
    role, content = m["role"], m.get("content")
    if role == "system":
        # A system turn among the messages (Claude Code sends its environment so).
        return [{"role": "system", "content": text(content, where)}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}: 'content' must be a string or a list of blocks")
    if role == "assistant":
        return [_assistant(content, where)]
    return _user(content, where)


def _assistant(blocks: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            texts.append(str(b.get("text", "")))
        elif kind == "tool_use":
            calls.append({"id": str(b.get("id") or new_id("toolu_")), "type": "function",
                          "function": {"name": str(b.get("name", "")),
                                       "arguments": json.dumps(b.get("input") or {})}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # not sent back: see the module's docstring
        else:
            raise BadRequest(f"{where}.content[{j}]: block type {kind!r} cannot be sent to a "
                             "chat completions upstream")
    # null content only beside tool calls: several servers refuse it otherwise.
    msg: dict[str, Any] = {"role": "assistant",
                           "content": "".join(texts) or (None if calls else "")}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _user(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        at = f"{where}.content[{j}]"
        if kind == "text":
            parts.append({"type": "text", "text": str(b.get("text", ""))})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image(b.get("source"), at)}})
        elif kind == "tool_result":
            content = text(b.get("content"), at)
            if b.get("is_error") is True:
                content = f"Error: {content}"
            results.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")),
                            "content": content})
        else:
            raise BadRequest(f"{at}: block type {kind!r} cannot be sent to a chat completions "
                             "upstream")
    if not parts:
        return results
    if all(p["type"] == "text" for p in parts):
        # A plain string: some chat servers accept nothing else for text-only turns.
        return [*results, {"role": "user", "content": "\n".join(p["text"] for p in parts)}]
    return [*results, {"role": "user", "content": parts}]


def _image(source: Any, at: str) -> str:
    if isinstance(source, dict) and source.get("type") == "base64":
        return f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    if isinstance(source, dict) and source.get("type") == "url":
        return str(source.get("url", ""))
    raise BadRequest(f"{at}: an image's 'source' must be base64 or url")


def _tool(t: Any) -> dict[str, Any] | None:
    """A client tool as a chat function; None for a server tool (``web_search_…``,
    ``bash_…``): it runs at Anthropic, so the model works without it."""
    if not isinstance(t, dict) or "name" not in t:
        raise BadRequest("each tool needs a 'name'")
    if t.get("type") not in (None, "custom"):
        return None
    fn: dict[str, Any] = {"name": t["name"],
                          "parameters": t.get("input_schema") or {"type": "object"}}
    if t.get("description"):
        fn["description"] = t["description"]
    return {"type": "function", "function": fn}


def _tool_choice(c: dict[str, Any], chat: dict[str, Any]) -> None:
    kind = c.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        force_tool(chat, c.get("name"))
    if c.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


# --- answer -------------------------------------------------------------------------------


def stop_reason(reason: str | None, c: dict[str, Any], ask: Asked) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence). A server that names the stop string it met (vLLM's
    ``stop_reason``) lets a stop sequence be told from the end of a turn."""
    matched = c.get("stop_reason")
    if reason == "stop" and isinstance(matched, str) and matched in ask.stop_sequences:
        return "stop_sequence", matched
    return _STOP.get(reason or "stop", "end_turn"), None


def usage(u: Usage | None) -> dict[str, int]:
    if u is None:
        return {"input_tokens": 0, "output_tokens": 0}
    # Anthropic counts cache reads apart from input_tokens.
    out = {"input_tokens": u.prompt - u.cached, "output_tokens": u.completion}
    if u.cached:
        out["cache_read_input_tokens"] = u.cached
    return out


def response(answer: dict[str, Any], ask: Asked) -> dict[str, Any]:
    """A chat completion as an Anthropic message."""
    c = choice(answer)
    msg = c.get("message") or {}
    blocks: list[dict[str, Any]] = []
    reasoning = msg.get("reasoning_content")
    if ask.thinking and isinstance(reasoning, str) and reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    content = msg.get("content")
    calls = msg.get("tool_calls") or []
    if isinstance(content, str) and (content or not calls):
        blocks.append({"type": "text", "text": content})
    for call in calls:
        fn = call.get("function") or {}
        blocks.append({"type": "tool_use", "id": str(call.get("id") or new_id("toolu_")),
                       "name": str(fn.get("name", "")), "input": arguments(fn.get("arguments"))})
    stop, sequence = stop_reason(finish_reason(c), c, ask)
    if calls and stop == "end_turn":
        stop = "tool_use"  # some servers finish a tool call with "stop"
    return {
        "id": _message_id(answer), "type": "message", "role": "assistant",
        "model": ask.model or answer.get("model", ""), "content": blocks,
        "stop_reason": stop, "stop_sequence": sequence,
        "usage": usage(Usage.of(answer.get("usage"))),
    }


def count_response(answer: dict[str, Any]) -> dict[str, Any]:
    u = Usage.of(answer.get("usage"))
    return {"input_tokens": u.prompt if u else 0}


def _message_id(answer: dict[str, Any]) -> str:
    ident = answer.get("id")
    return f"msg_{ident}" if isinstance(ident, str) and ident else new_id("msg_")


# --- stream -------------------------------------------------------------------------------


@dataclass(slots=True)
class Stream:
    """Chat chunks in, Anthropic stream events out. ``start()`` once, ``feed()`` per
    chunk, ``finish()`` at the end of the upstream stream."""

    ask: Asked
    _block: int = -1
    _kind: str | None = None  # the open block's type
    _tools: ToolDeltas = field(default_factory=ToolDeltas)
    _tool_blocks: dict[int, int] = field(default_factory=dict)
    _finish: str | None = None
    _choice: dict[str, Any] = field(default_factory=dict)
    _usage: Usage | None = None
    # The bytes before the text of a text delta in block ``_head_block``.
    _head: bytes = b""
    _head_block: int = -1

    def start(self, first: dict[str, Any]) -> list[Event]:
        message: dict[str, Any] = {
            "id": _message_id(first), "type": "message", "role": "assistant",
            "model": self.ask.model or first.get("model", ""), "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message}),
                ("ping", {"type": "ping"})]

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        if chunk.get("usage"):
            self._usage = Usage.of(chunk["usage"])
        c = choice(chunk)
        if not c:
            return out
        delta = c.get("delta") or {}
        reasoning = delta.get("reasoning_content")
        if self.ask.thinking and isinstance(reasoning, str) and reasoning:
            out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
        content = delta.get("content")
        if isinstance(content, str) and content:
            out += self._open("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": content}))
        for index, new, piece in self._tools.feed(delta.get("tool_calls")):
            if new:
                call = self._tools.calls[index]
                out += self._open(f"tool_use:{index}", {
                    "type": "tool_use", "id": call.id, "name": call.name, "input": {}})
                self._tool_blocks[index] = self._block
            if piece and self._tool_blocks.get(index) == self._block:
                out.append(self._delta({"type": "input_json_delta", "partial_json": piece}))
        reason = finish_reason(c)
        if reason is not None:
            self._finish, self._choice = reason, c
        return out

    def text_frame(self, text: str) -> bytes | None:
        """The SSE frame of a plain content delta (``chunks.plain_text``) that continues
        the open text block, as ``encode(feed(chunk))`` writes it; None: the block must
        open first, so ``feed`` has to see the chunk."""
        if self._kind != "text":
            return None
        if not text:
            return b""
        if self._head_block != self._block:
            self._head_block = self._block
            self._head = (b'event: content_block_delta\ndata: {"type":"content_block_delta",'
                          b'"index":' + str(self._block).encode()
                          + b',"delta":{"type":"text_delta","text":')
        return self._head + encode(text) + b"}}\n\n"

    def finish(self) -> list[Event]:
        out = self._close()
        stop, sequence = stop_reason(self._finish, self._choice, self.ask)
        if self._tools.calls and stop == "end_turn":
            stop = "tool_use"
        u = usage(self._usage)
        out.append(("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop, "stop_sequence": sequence},
                                      "usage": u}))
        out.append(("message_stop", {"type": "message_stop"}))
        return out

    def _open(self, kind: str, block: dict[str, Any]) -> list[Event]:
        if self._kind == kind:
            return []
        out = self._close()
        self._block += 1
        self._kind = kind
        out.append(("content_block_start", {"type": "content_block_start",
                                            "index": self._block, "content_block": block}))
        return out

    def _close(self) -> list[Event]:
        if self._kind is None:
            return []
        self._kind = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._block})]

    def _delta(self, delta: dict[str, Any]) -> Event:
        return ("content_block_delta", {"type": "content_block_delta", "index": self._block,
                                        "delta": delta})

"""The chat-completions side shared by every pair: reading an answer, its usage, and
the tool-call deltas of a stream. Pure."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from scheduler.errors import BadRequest


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def choice(answer: dict[str, Any]) -> dict[str, Any]:
    """The first choice of a chat answer or chunk ({} when there is none)."""
    choices = answer.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


@dataclass(slots=True)
class Usage:
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    reasoning: int = 0

    @classmethod
    def of(cls, raw: Any) -> Usage | None:
        if not isinstance(raw, dict):
            return None
        prompt_details = raw.get("prompt_tokens_details") or {}
        done_details = raw.get("completion_tokens_details") or {}
        return cls(
            prompt=_int(raw.get("prompt_tokens")),
            completion=_int(raw.get("completion_tokens")),
            cached=_int(prompt_details.get("cached_tokens")),
            reasoning=_int(done_details.get("reasoning_tokens")),
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def arguments(raw: Any) -> dict[str, Any]:
    """A tool call's JSON arguments as an object. A model may emit broken JSON; the
    client's own field is an object, so the text is kept under ``arguments``."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str) or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {"arguments": raw}
    return value if isinstance(value, dict) else {"arguments": value}


def text(content: Any, what: str) -> str:
    """Text of a string or of a list of text parts (tool results, system prompts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in ("image", "input_image"):
                # Chat has no image in a system prompt or a tool result.
                out.append("[image]")
            else:
                raise BadRequest(f"{what}: a part must be text")
        return "\n".join(out)
    raise BadRequest(f"{what} must be a string or a list of text parts")


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass(slots=True)
class ToolDeltas:
    """Tool calls assembled from a stream's deltas, keyed by their chat ``index``."""

    calls: dict[int, ToolCall] = field(default_factory=dict)

    def feed(self, deltas: Any) -> list[tuple[int, bool, str]]:
        """(index, is_new, arguments fragment) per delta; a new call's id and name are
        in ``calls[index]``."""
        out: list[tuple[int, bool, str]] = []
        if not deltas:
            return out  # nearly every chunk: text, no tool call
        for pos, d in enumerate(deltas if isinstance(deltas, list) else []):
            if not isinstance(d, dict):
                continue
            index = d.get("index", pos)
            fn = d.get("function") or {}
            piece = fn.get("arguments") or ""
            if not isinstance(piece, str):
                piece = json.dumps(piece)
            call = self.calls.get(index)
            if call is None:
                call = ToolCall(str(d.get("id") or new_id("call_")), str(fn.get("name") or ""))
                self.calls[index] = call
                call.arguments = piece
                out.append((index, True, piece))
            else:
                call.arguments += piece
                out.append((index, False, piece))
        return out


def finish_reason(c: dict[str, Any]) -> str | None:
    reason = c.get("finish_reason")
    return reason if isinstance(reason, str) else None


def stream_options(body: dict[str, Any]) -> None:
    """Ask a streaming chat upstream for usage in its last chunk."""
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}


def force_tool(chat: dict[str, Any], name: Any) -> None:
    """Make the model call the tool ``name``: the other tools left out and
    ``tool_choice: "required"``. The same as OpenAI's named tool choice, and what
    servers that take only a string there (llama-server) understand."""
    tools = chat.get("tools") or []
    named = [t for t in tools if (t.get("function") or {}).get("name") == name]
    if named:
        chat["tools"] = named
        chat["tool_choice"] = "required"
    else:
        # Not among the tools: the upstream's own error says so.
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}

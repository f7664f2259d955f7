"""ChatHistoryData → OpenAI chat messages (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from proxy.dialects.lmstudio_sdk.codec import SdkError


def _text(parts: list[Any]) -> str:
    return "".join(str(p.get("text", "")) for p in parts
                   if isinstance(p, Mapping) and p.get("type") == "text")


def messages(history: object) -> list[dict[str, Any]]:
    if not isinstance(history, Mapping) or not isinstance(history.get("messages"), list):
        raise SdkError("history must be {\"messages\": [...]}")
    out: list[dict[str, Any]] = []
    for m in history["messages"]:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise SdkError("each history message needs a role")
        role, content = m["role"], m.get("content")
        parts: list[Any] = (content if isinstance(content, list)
                            else [{"type": "text", "text": content}])
        if any(isinstance(p, Mapping) and p.get("type") == "file" for p in parts):
            raise SdkError("file and image parts are not supported by Corral")
        if role == "tool":
            for p in parts:
                if isinstance(p, Mapping) and p.get("type") == "toolCallResult":
                    result: dict[str, Any] = {"role": "tool", "content": str(p.get("content", ""))}
                    if p.get("toolCallId"):
                        result["tool_call_id"] = p["toolCallId"]
                    out.append(result)
            continue
        msg: dict[str, Any] = {"role": role, "content": _text(parts)}
        calls: list[Mapping[str, Any]] = [p["toolCallRequest"] for p in parts
                 if isinstance(p, Mapping) and p.get("type") == "toolCallRequest"
                 and isinstance(p.get("toolCallRequest"), Mapping)]
        if calls:
            msg["tool_calls"] = [
                {"id": c.get("id") or f"call_{i}", "type": "function",
                 "function": {"name": c.get("name", ""),
                              "arguments": json.dumps(c.get("arguments") or {})}}
                for i, c in enumerate(calls)
            ]
        out.append(msg)
    return out


def raw_prompt(history: object) -> str:
    """The prompt of Python's complete(): the messages' text concatenated."""
    return "".join(m["content"] for m in messages(history) if isinstance(m.get("content"), str))

"""OpenAI Responses input as chat completions input: items as chat messages, tools
(a ``namespace`` tool's functions as ``NAMESPACE__NAME``) and tool_choice as chat's.
Pure: dicts in, dicts out; the rest of the family is ``responses_chat.py``."""

from __future__ import annotations

from typing import Any

from proxy.dialects.families.chat import new_id, text
from scheduler.errors import BadRequest

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def add_item(item: Any, where: str, out: list[dict[str, Any]]) -> None:
    """One input item appended to ``out`` as chat messages (a function call joins the
    assistant turn before it)."""
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object")
    kind = item.get("type", "message")
    if kind == "message":
        role = _ROLES.get(item.get("role", ""))
        if role is None:
            raise BadRequest(f"{where}: 'role' must be user, assistant, system or developer")
        out.append({"role": role, "content": content_of(item.get("content"), role, where)})
    elif kind == "function_call":
        name = str(item.get("name", ""))
        if item.get("namespace"):
            name = f"{item['namespace']}{SEP}{name}"
        call = {"id": str(item.get("call_id") or item.get("id") or new_id("call_")),
                "type": "function",
                "function": {"name": name, "arguments": str(item.get("arguments") or "{}")}}
        last = out[-1] if out else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
        else:
            out.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        out.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                    "content": output if isinstance(output, str) else text(output, where)})
    elif kind == "reasoning":
        return  # a chat upstream takes no reasoning back
    else:
        raise BadRequest(f"{where}: item type {kind!r} cannot be sent to a chat completions "
                         "upstream")


def content_of(content: Any, role: str, where: str) -> Any:
    """A message's content parts as chat content."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where}: 'content' must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": str(p.get("text", ""))})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(p.get("refusal", ""))})
        elif kind == "input_image" and isinstance(p.get("image_url"), str):
            image: dict[str, Any] = {"url": p["image_url"]}
            if p.get("detail") in ("low", "high", "auto"):
                image["detail"] = p["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise BadRequest(f"{where}.content[{j}]: part type {kind!r} cannot be sent to a "
                             "chat completions upstream (images go as 'image_url')")
    if role != "user" or all(p["type"] == "text" for p in parts):
        # Only a user turn may carry images; the others are text in every server.
        return "".join(p.get("text", "") for p in parts)
    return parts


# Between a namespace and a function's name in the chat tool's name: chat names allow
# letters, digits, "_" and "-" only.
SEP = "__"


def tools_of(t: Any, namespace: str = "") -> list[dict[str, Any]]:
    """The chat function tools of one Responses tool. Built-in tools (web_search,
    file_search, code_interpreter, custom, mcp, ...) run at OpenAI, not in a chat
    upstream: they are left out and the model works without them."""
    if not isinstance(t, dict):
        raise BadRequest("each tool must be an object")
    if t.get("type") == "namespace" and not namespace:
        inner = t.get("tools")
        return [fn for x in (inner if isinstance(inner, list) else [])
                for fn in tools_of(x, f"{t.get('name')}{SEP}")]
    if t.get("type") != "function":
        return []
    fn = {k: t[k] for k in ("name", "description", "parameters", "strict")
          if t.get(k) is not None}
    fn["name"] = namespace + str(fn.get("name", ""))
    return [{"type": "function", "function": fn}]


def tool_choice_of(c: Any) -> Any:
    """A Responses tool_choice as chat's."""
    if isinstance(c, str):
        return c
    if isinstance(c, dict) and c.get("type") == "function":
        name = str(c.get("name"))
        if c.get("namespace"):
            name = f"{c['namespace']}{SEP}{name}"
        return {"type": "function", "function": {"name": name}}
    if isinstance(c, dict):
        return "auto"  # a built-in tool, left out (see tools_of)
    raise BadRequest("'tool_choice' must be auto, none, required or an object")


def split_name(name: str, namespaces: frozenset[str]) -> tuple[str, str | None]:
    """A chat tool name as (name, namespace) of the request's tools."""
    ns, sep, rest = name.partition(SEP)
    return (rest, ns) if sep and ns in namespaces else (name, None)
